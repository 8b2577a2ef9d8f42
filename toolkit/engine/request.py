"""Request state: sampling parameters, the sequence being generated, its output."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import random
import time
from typing import Any, Callable, Optional

_ids = itertools.count()


@dataclasses.dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters.

    The same seed gives the same tokens whatever else is in the batch: each
    draw uses key fold_in(PRNGKey(seed), index of the token in the output).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the field that is out of range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_k < 2**31:  # int32 on device; values above the vocab mean "off"
            raise ValueError(f"top_k must be in [0, 2**31) (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Validated params from a JSON object (what ``to_dict`` writes); an unknown field or
        a value out of range raises ValueError naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling field {unknown[0]!r}; known: {', '.join(sorted(names))}")
        p = cls(**d)
        p.validate()
        return p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)  # identity: sequences are compared as objects
class Sequence:
    """One request. ``token_ids`` = prompt + output; ``num_computed`` of them have KV in the pool.

    A step feeds token_ids[num_computed : num_computed + n] and samples a token
    only when that reaches the end of token_ids; so decode is the case n == 1.
    With overlapped scheduling a step is launched before the previous one's tokens
    reach the host: ``num_inflight`` (0 or 1) counts a sampled token still on the
    device; the next step feeds it straight from the device.
    """

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None
    text: str = ""
    on_token: Optional[Callable[["Sequence", int, str], None]] = None
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    seed: Optional[int] = None  # resolved at creation: params.seed, or a random one
    num_preemptions: int = 0
    num_inflight: int = 0
    room: Optional[int] = None  # P/D room id on the disaggregated roles (None when unified)
    cache_node: Optional[Any] = None  # the prefix-cache node this request holds locked (CacheManager)
    num_cached: int = 0  # prompt tokens found in the prefix cache at its first admission
    num_committed_pages: int = 0  # whole pages decode_offload committed to the prefix cache so far
    state_slot: int = 0  # its slot in the recurrent-state pool (hybrid models; 0: none)

    def __post_init__(self):
        # The one place a seed is resolved: a request without one draws it once, so a
        # recomputed (preempted) request samples the same tokens again.
        if self.seed is None:
            self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(32)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to feed before the next sample (an in-flight token counts)."""
        return self.num_tokens + self.num_inflight - self.num_computed

    def at_length_limit(self, max_model_len: int, extra: int = 0) -> bool:
        """Would ``extra`` more output tokens reach max_new_tokens or the context length?"""
        return (len(self.output_ids) + extra >= self.params.max_new_tokens
                or self.num_tokens + extra >= max_model_len)

    def known_tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without concatenating prompt and output (a decode step
        asks for one token of a long sequence)."""
        P = len(self.prompt_ids)
        if start >= P:
            return self.output_ids[start - P:end - P]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - P)]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: Optional[str]
    ttft_s: Optional[float]
    latency_s: Optional[float]
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (any tier)

    @classmethod
    def of(cls, seq: Sequence) -> "RequestOutput":
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time
        lat = None if seq.finish_time is None else seq.finish_time - seq.arrival_time
        return cls(seq.request_id, list(seq.prompt_ids), list(seq.output_ids), seq.text,
                   list(seq.output_logprobs), seq.finish_reason, ttft, lat, seq.num_cached)
