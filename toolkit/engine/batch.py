"""What the scheduler hands the runner: plain Python, no JAX (the scheduler's unit tests
run without it)."""

from __future__ import annotations

import dataclasses

from toolkit.engine.request import Sequence


@dataclasses.dataclass
class ScheduledBatch:
    """One step's work: ``num_tokens[i]`` tokens of ``seqs[i]``, fed from its ``num_computed``.

    A decode step feeds one token per sequence; a prefill step feeds chunks of prompts."""

    seqs: list[Sequence]
    num_tokens: list[int]  # tokens fed per sequence this step
    is_decode: bool
