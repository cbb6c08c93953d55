"""Host-side request and sequence state. No JAX here."""

from __future__ import annotations

import enum
import time

from jserve.outputs import Logprob, PromptLogprobs
from jserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One user request; with ``n > 1`` it owns n sequences after its prefill."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        max_output_tokens: int,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_id: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seed = seed
        self.max_output_tokens = max_output_tokens  # each sequence ends ("length") here
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.lora_id = lora_id  # its LoRA adapter (jserve.lora), 0 for the base model
        self.lora_salt = 0  # that adapter's prefix-cache salt (LoRAManager.salt)
        self.seqs: list[Sequence] = []
        self.num_cached_tokens = 0
        self.aborted = False
        # With params.prompt_logprobs (see engine.logprobs): positions
        # [0, num_prompt_scored) of the prompt are planned for scoring, each once
        # however often the prompt is recomputed; their results collect in
        # prompt_logprobs (None first), handed out once complete.
        self.num_prompt_scored = 0
        self.prompt_logprobs: PromptLogprobs | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        # An aborted request ends even if it had not yet forked into its n samples.
        done = self.aborted or len(self.seqs) == self.params.n
        return done and all(s.finished for s in self.seqs)


class Sequence:
    """One stream of tokens with its own pages; owned by the scheduler.

    ``token_ids`` holds every known token (prompt, then outputs). A token that
    was sampled on the device but not yet copied back is *pending*: it counts
    in ``num_tokens`` and is fed to the next step straight from the device.
    """

    def __init__(
        self,
        seq_id: int,
        request: Request,
        index: int,
        token_ids: list[int],
    ) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index  # which of the request's n samples
        self.token_ids = token_ids
        self.num_prompt_tokens = len(request.prompt_token_ids)
        # Sampled on the device, value not yet on the host: up to 2, between
        # scheduling step N and collecting step N-1.
        self.num_pending = 0
        self.num_computed = 0  # tokens whose K/V are in this sequence's pages
        self.pages: list[int] = []
        # How many leading entries of `pages` the runner's page table already holds.
        self.synced_pages = 0
        self.page_hashes: list[int] = []  # hash-chain keys of this sequence's full pages
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, Logprob]] = []
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0
        # Speculative proposals chosen for the step being planned (see Scheduler).
        self.drafts: list[int] = []
        # Where the newest pending token is on the device: (step id, row).
        self.pending_row: tuple[int, int] | None = None
        # Its adapter's device slot while it runs (-1: the base model; jserve.lora).
        self.lora_slot = -1
        # Outputs already handed to the caller (for deltas).
        self.num_emitted_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then arrival, then sample index."""
        return (self.request.priority, self.request.arrival_time, self.seq_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.index}, {self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed}, pages={self.pages})"
        )
