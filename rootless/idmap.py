"""The id mapping a build runs under: pure data, shared by the environment code and the store.

The store records the mapping it was made with (files on disk carry outside ids), so it needs the type
without importing the code that sets namespaces up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Range = tuple[int, int, int]  # (inside, outside, count)


@dataclass(frozen=True)
class IdMap:
    uids: tuple[Range, ...]
    gids: tuple[Range, ...]
    real_root: bool = False

    @property
    def single(self) -> bool:
        return not self.real_root and len(self.uids) == 1 and self.uids[0][2] == 1

    def to_json(self) -> dict[str, object]:
        return {"uids": [list(r) for r in self.uids], "gids": [list(r) for r in self.gids], "root": self.real_root}

    @staticmethod
    def from_json(data: dict[str, object]) -> IdMap:
        def ranges(key: str) -> tuple[Range, ...]:
            raw: Any = data.get(key) or []
            return tuple((int(a), int(b), int(c)) for a, b, c in raw)

        return IdMap(ranges("uids"), ranges("gids"), bool(data.get("root")))

    def describe(self) -> str:
        if self.real_root:
            return "real root (no user namespace)"
        return (
            "uids "
            + ",".join(f"{a}:{b}:{c}" for a, b, c in self.uids)
            + " gids "
            + ",".join(f"{a}:{b}:{c}" for a, b, c in self.gids)
        )
