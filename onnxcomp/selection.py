"""Which nodes a pass may touch: one selection rule shared by quantization, pruning and clustering."""

from __future__ import annotations

import re

__all__ = ["NodeSelector", "unmatched_entries"]


class NodeSelector:
    """Which nodes a pass may touch: ``op_types`` (empty = all) minus ``exclude``.

    An exclude entry matches a node by exact name, by op type, or by regex on the name when it is
    written ``re:PATTERN``.
    """

    def __init__(self, op_types: tuple[str, ...], exclude: tuple[str, ...]) -> None:
        self.op_types = frozenset(op_types)
        self.names = frozenset(e for e in exclude if not e.startswith("re:"))
        self.patterns = [re.compile(e[3:]) for e in exclude if e.startswith("re:")]

    def excluded(self, name: str, op_type: str) -> bool:
        if name in self.names or op_type in self.names:
            return True
        return any(p.search(name or "") for p in self.patterns)

    def allows(self, name: str, op_type: str) -> bool:
        if self.op_types and op_type not in self.op_types:
            return False
        return not self.excluded(name, op_type)


def unmatched_entries(entries: tuple[str, ...], names: set[str]) -> list[str]:
    """The entries of an ``exclude`` or ``op_types`` list that match none of ``names`` (exactly,
    or by ``re:PATTERN`` search): entries with no effect, most often a typo."""
    missing = []
    for entry in entries:
        if entry.startswith("re:"):
            pattern = re.compile(entry[3:])
            if not any(pattern.search(n) for n in names):
                missing.append(entry)
        elif entry not in names:
            missing.append(entry)
    return missing
