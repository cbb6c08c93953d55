"""Multi-LoRA serving: many PEFT adapters over one base model, mixed in one batch.

- ``adapter``: reads and checks a PEFT adapter directory into jserve's fused layout.
- ``manager``: ``LoRARequest``, and ``LoRAManager``: registered adapters, the host LRU
  (``max_cpu_loras``) and the device slots (``max_loras``) the scheduler acquires.
- ``ops``: the stacked slots on the device and the batched gather matmul of a step.
"""

from jserve.lora.adapter import AdapterError
from jserve.lora.manager import LoRAManager, LoRARequest

__all__ = ["AdapterError", "LoRAManager", "LoRARequest"]
