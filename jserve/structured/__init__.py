"""Structured output: grammars over the token vocabulary, enforced by a bitmask on the device.

``params`` holds what a request asks for (``StructuredOutputsParams``);
``manager`` compiles it with llguidance, keeps one matcher per constrained
sequence, fills each step's token bitmask and advances the matchers with the
sampled tokens. The engine reaches it through small hooks: validation, the
runner's plan (the bitmask), the tokens a step returned, and a finished
sequence's release.
"""

from jserve.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
