"""Items kept out of use until their owner's peer confirms, or a deadline passes.

The one mechanism behind every "a failed transfer's target may still be written" rule:
the CacheManager holds a failed room's pages, the AuxBuffer its aux slot."""

from __future__ import annotations

import time
from typing import Any, Hashable


class Holds:
    def __init__(self):
        self._held: dict[Hashable, tuple[float, Any]] = {}  # owner -> (deadline, item)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, owner: Hashable) -> bool:
        return owner in self._held

    def items(self) -> list[Any]:
        return [item for _, item in self._held.values()]

    def owners(self) -> list[Hashable]:
        return list(self._held)

    def hold(self, owner: Hashable, item: Any, hold_s: float) -> None:
        assert owner not in self._held, f"{owner!r} already holds something"
        self._held[owner] = (time.perf_counter() + hold_s, item)

    def pop(self, owner: Hashable, default: Any = None) -> Any:
        """The held item of ``owner`` (its hold ends), or ``default``."""
        held = self._held.pop(owner, None)
        return default if held is None else held[1]

    def expired(self, now: float | None = None) -> list[Hashable]:
        """Owners whose deadline passed (their holds still stand: ``pop`` them)."""
        now = time.perf_counter() if now is None else now
        return [o for o, (deadline, _) in self._held.items() if deadline <= now]
