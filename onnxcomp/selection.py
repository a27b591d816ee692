"""Which nodes a pass may touch: one selection rule shared by quantization, pruning and clustering."""

from __future__ import annotations

import re

__all__ = ["NodeSelector"]


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
