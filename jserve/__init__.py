"""jserve: a JAX/XLA inference engine for large language models."""

# First: in the `jserve` command, Ctrl-C during the imports below exits at once.
import jserve.cli.interrupt  # noqa: F401
from jserve.errors import (
    CapacityError,
    CheckpointError,
    ConfigError,
    EngineStepError,
    InvalidRequestError,
    JserveError,
    RequestTooLargeError,
)
from jserve.llm import LLM
from jserve.lora import AdapterError, LoRARequest
from jserve.outputs import CompletionOutput, Logprob, RequestOutput
from jserve.sampling_params import SamplingParams
from jserve.structured import StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AdapterError",
    "CapacityError",
    "CheckpointError",
    "CompletionOutput",
    "ConfigError",
    "EngineStepError",
    "InvalidRequestError",
    "JserveError",
    "LoRARequest",
    "Logprob",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
    "StructuredOutputsParams",
]
