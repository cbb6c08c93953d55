"""The adapters an engine knows, which are in host memory, and which hold device slots.

- Registered adapters (``LoRARequest``: name, int id, path) are read and checked
  when registered (``jserve.lora.adapter``) and kept in a host LRU of
  ``max_cpu_loras``; one dropped from it is read again from its directory when a
  sequence needs it in a device slot.
- ``max_loras`` device slots. The scheduler ``acquire``s a slot for a sequence
  as it starts running and ``release``s it when the sequence stops; a slot whose
  adapter no running sequence uses may be given to another adapter (least
  recently used first), so evictions happen only between uses. A slot change is
  queued as a load (``take_loads``) that the runner writes into the device's
  stacked slots in place before the step that needs it.

Plain Python and numpy; no JAX here.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any

import numpy as np

from jserve.config import ModelConfig
from jserve.lora.adapter import AdapterError, HostAdapter, WeightSlot, load_adapter, weight_slots

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request, in vLLM's form: ``LoRARequest("sql", 1, "/adapters/sql")``.
    ``lora_int_id`` (>= 1) identifies it inside the engine; a name and id pair stays fixed
    once registered."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A stacked slot array's declaration (what ``sharding.param_shardings`` reads)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


def _check_request(req: Any) -> LoRARequest:
    if not isinstance(req, LoRARequest):
        raise AdapterError(f"lora_request must be a LoRARequest, got {type(req).__name__}")
    if not isinstance(req.lora_name, str) or not req.lora_name:
        raise AdapterError(f"LoRA adapter name must be a non-empty string, got {req.lora_name!r}")
    if isinstance(req.lora_int_id, bool) or not isinstance(req.lora_int_id, int):
        raise AdapterError(f"LoRA adapter {req.lora_name!r}: lora_int_id must be an integer")
    if req.lora_int_id < 1:
        raise AdapterError(
            f"LoRA adapter {req.lora_name!r}: lora_int_id must be >= 1, got {req.lora_int_id}"
        )
    if not isinstance(req.lora_path, str | os.PathLike) or not os.fspath(req.lora_path):
        raise AdapterError(f"LoRA adapter {req.lora_name!r}: lora_path must be a directory")
    return req


class LoRAManager:
    def __init__(
        self,
        cfg: ModelConfig,
        layer_keys: list[set[str]],
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int,
        dtype: Any,
    ) -> None:
        self.cfg = cfg
        self.max_loras = max_loras
        self.max_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = np.dtype(dtype)
        self.slots: list[dict[str, WeightSlot]] = weight_slots(cfg, layer_keys)
        self.known: dict[int, LoRARequest] = {}  # registered, by id
        self._id_of: dict[str, int] = {}  # by name
        # Prefix-cache salt per registration: an id registered again (after a remove) for
        # other weights never finds the pages its former adapter computed.
        self._salt_of: dict[int, int] = {}
        self._next_salt = 1
        self.host: collections.OrderedDict[int, HostAdapter] = collections.OrderedDict()
        self._holds: collections.Counter[int] = collections.Counter()  # unfinished requests
        self.users: collections.Counter[int] = collections.Counter()  # running sequences
        self.slot_of: dict[int, int] = {}
        self._owner: list[int | None] = [None] * max_loras
        # Slots in eviction order: least recently used first.
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(
            range(max_loras)
        )
        self._loads: list[tuple[int, Any]] = []
        self.num_loads = 0  # adapters written into a device slot
        self.num_evictions = 0  # of those, the ones that replaced another adapter
        self.num_host_loads = 0  # reads from disk

    # -- registration ---------------------------------------------------------

    def read(self, name: str, path: str) -> HostAdapter:
        """Reads and checks an adapter for this model without registering it (it touches
        no state: any thread may call it, e.g. to read before ``register``)."""
        return load_adapter(name, path, self.cfg, self.slots, self.max_rank, self.dtype)

    def register(self, req: LoRARequest, adapter: HostAdapter | None = None) -> int:
        """Knows ``req`` (reading and checking it when it is new, unless ``adapter`` is
        what ``read`` gave for it); returns its id. AdapterError, with nothing changed, for
        a bad adapter or a name or id that is already taken by another adapter."""
        req = _check_request(req)
        rid, name = req.lora_int_id, req.lora_name
        known = self.known.get(rid)
        if known is not None and (known.lora_name != name or known.lora_path != req.lora_path):
            raise AdapterError(
                f"lora_int_id {rid} is already adapter {known.lora_name!r} ({known.lora_path}); "
                "give each adapter its own id"
            )
        if self._id_of.get(name, rid) != rid:
            raise AdapterError(
                f"LoRA adapter name {name!r} is already adapter id {self._id_of[name]}; give "
                "each adapter its own name"
            )
        if known is not None:  # checked when registered; read again when it is to run
            return rid
        self._host_adapter(req, adapter)
        self.known[rid] = req
        self._id_of[name] = rid
        self._salt_of[rid] = self._next_salt
        self._next_salt += 1
        return rid

    def salt(self, rid: int) -> int:
        """The prefix-cache salt of registered adapter ``rid`` (0: the base model)."""
        return self._salt_of[rid] if rid else 0

    def get(self, name: str) -> LoRARequest | None:
        rid = self._id_of.get(name)
        return None if rid is None else self.known[rid]

    def remove(self, name: str) -> LoRARequest:
        """Forgets an adapter that no request uses (the engine checks that first)."""
        rid = self._id_of.pop(name)
        req = self.known.pop(rid)
        del self._salt_of[rid]
        assert not self._holds[rid] and not self.users[rid], name
        self.host.pop(rid, None)
        slot = self.slot_of.pop(rid, None)
        if slot is not None:
            self._owner[slot] = None
            self._lru.move_to_end(slot, last=False)
        return req

    def _host_adapter(self, req: LoRARequest, adapter: HostAdapter | None = None) -> HostAdapter:
        rid = req.lora_int_id
        if rid in self.host:
            self.host.move_to_end(rid)
            return self.host[rid]
        if adapter is None:
            adapter = self.read(req.lora_name, os.fspath(req.lora_path))
        self.num_host_loads += 1
        while len(self.host) >= self.max_cpu_loras:
            self.host.popitem(last=False)  # the least recently used
        self.host[rid] = adapter
        return adapter

    # -- requests -------------------------------------------------------------

    def hold(self, rid: int) -> None:
        """A request using adapter ``rid`` was queued (the adapter cannot be removed)."""
        if rid:
            self._holds[rid] += 1

    def unhold(self, rid: int) -> None:
        if rid:
            self._holds[rid] -= 1

    def in_use(self, rid: int) -> int:
        """Requests (queued or running) that use adapter ``rid``."""
        return self._holds[rid]

    # -- device slots -----------------------------------------------------------

    def can_acquire(self, rid: int) -> bool:
        """Whether a sequence using adapter ``rid`` (0: none) can start running now; reads
        the adapter into host memory again if it left it (AdapterError if it no longer
        can be, e.g. its directory was removed)."""
        if not rid or rid in self.slot_of:
            return True
        if not any(not self._busy(slot) for slot in self._lru):
            return False
        self._host_adapter(self.known[rid])
        return True

    def _busy(self, slot: int) -> bool:
        owner = self._owner[slot]
        return owner is not None and self.users[owner] > 0

    def acquire(self, rid: int) -> int:
        """The device slot of adapter ``rid`` for a sequence starting to run (-1 for the base
        model), loading it into the least recently used free slot if needed."""
        if not rid:
            return -1
        slot = self.slot_of.get(rid)
        if slot is None:
            slot = next(s for s in self._lru if not self._busy(s))
            old = self._owner[slot]
            if old is not None:
                del self.slot_of[old]
                self.num_evictions += 1
            self._owner[slot] = rid
            self.slot_of[rid] = slot
            self._loads.append((slot, self.device_weights(self._host_adapter(self.known[rid]))))
            self.num_loads += 1
        self.users[rid] += 1
        self._lru.move_to_end(slot)
        return slot

    def release(self, rid: int) -> None:
        """A sequence using adapter ``rid`` stopped running."""
        if rid:
            self.users[rid] -= 1
            assert self.users[rid] >= 0, rid

    def take_loads(self) -> list[tuple[int, Any]]:
        """(slot, weights) to write into the device before the next step."""
        loads, self._loads = self._loads, []
        return loads

    def reset_device(self) -> None:
        """The device's slots were made afresh (zero): no adapter is resident."""
        self.slot_of.clear()
        self._owner = [None] * self.max_loras
        self._loads.clear()

    # -- layouts ------------------------------------------------------------------

    def specs(self) -> dict[str, Any]:
        """Declarations of the stacked device slots: per layer, per fused weight,
        ``a [S, *in, P*R]`` and ``b [S, P*R, *out]``, split like the base weight."""
        s, r = self.max_loras, self.max_rank
        layers = []
        for slots in self.slots:
            layer = {}
            for name, w in slots.items():
                width = w.parts * r
                layer[name] = {
                    "a": LoraSpec((s, *w.in_shape, width), (None, *w.in_axes, None)),
                    "b": LoraSpec((s, width, *w.out_shape), (None, None, *w.out_axes)),
                }
            layers.append(layer)
        return {"layers": layers}

    def device_weights(self, adapter: HostAdapter | None) -> dict[str, Any]:
        """One slot's contents (the ``specs`` tree without the slot axis) for ``adapter``:
        its weights, zero where it adapts nothing (None: all zero)."""
        r = self.max_rank
        layers = []
        for i, slots in enumerate(self.slots):
            layer = {}
            for name, w in slots.items():
                got = None if adapter is None else adapter.weights.get((i, name))
                if got is None:
                    width = w.parts * r
                    got = (
                        np.zeros((*w.in_shape, width), self.dtype),
                        np.zeros((width, *w.out_shape), self.dtype),
                    )
                layer[name] = {"a": got[0], "b": got[1]}
            layers.append(layer)
        return {"layers": layers}
