"""Channel index spaces: union-find over refinable "atoms", and layouts built from them.

This is the bookkeeping under :mod:`onnxcomp.analysis.channels`; it knows nothing about ONNX.

* An **atom** is a range of ``size`` channel indices. Atoms are merged with union-find: atoms in
  one class are the *same* channels (index c of one is index c of every other).
* A class can be **split** at an index k: every atom of the class is refined into ``[0, k)`` and
  ``[k, size)``, and the halves form two new classes. Refinement never loses a coupling, so
  splitting whenever a Split/Slice/Concat boundary needs it keeps the partition exact: the final
  leaf classes are the coarsest partition in which coupled channels are in the same class.
* A **layout** describes one tensor axis: a tuple of pieces ``(atom, block)`` laid end to end;
  the piece covers ``size(atom) * block`` consecutive indices, channel c of the atom occupying
  ``[start + c * block, start + (c + 1) * block)`` (``block > 1`` after Flatten: a channel becomes
  a run of features). Layouts are immutable and always read through :meth:`Spaces.expand`, which
  follows refinements down to the current leaves.
* A class carries **freeze reasons**; they survive merges and splits.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Layout", "Piece", "Spaces", "layout_length", "scale_blocks", "repeat"]

Piece = tuple[int, int]  # (atom, block)
Layout = tuple[Piece, ...]


def layout_length(spaces: Spaces, layout: Layout) -> int:
    return sum(spaces.size[a] * b for a, b in layout)


def scale_blocks(layout: Layout, factor: int) -> Layout:
    """Every index of the layout becomes ``factor`` consecutive indices (Flatten, depthwise)."""
    return tuple((a, b * factor) for a, b in layout)


def repeat(layout: Layout, times: int) -> Layout:
    return tuple(layout) * times


class Spaces:
    """Union-find over refinable atoms (see module docstring)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.children: list[tuple[int, int] | None] = []
        self._members: dict[int, list[int]] = {}
        self._reasons: dict[int, list[str]] = {}

    # ---- atoms and classes ---------------------------------------------------------------
    def new(self, size: int, reason: str | None = None) -> int:
        if size <= 0:
            raise ValueError(f"channel space size must be positive, got {size}")
        atom = len(self.parent)
        self.parent.append(atom)
        self.size.append(int(size))
        self.children.append(None)
        self._members[atom] = [atom]
        self._reasons[atom] = [reason] if reason else []
        return atom

    def find(self, atom: int) -> int:
        root = atom
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[atom] != root:
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # pragma: no cover - guarded by unify()
            raise AssertionError("union of channel spaces of different sizes")
        if len(self._members[ra]) < len(self._members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self._members[ra].extend(self._members.pop(rb))
        reasons = self._reasons[ra]
        for r in self._reasons.pop(rb):
            if r not in reasons:
                reasons.append(r)

    def reasons(self, atom: int) -> list[str]:
        return self._reasons[self.find(atom)]

    def freeze(self, atom: int, reason: str) -> None:
        for leaf in self.leaves(atom):
            reasons = self._reasons[self.find(leaf)]
            if reason not in reasons:
                reasons.append(reason)

    def split(self, atom: int, k: int) -> None:
        """Refine the (leaf) class of ``atom`` into ``[0, k)`` and ``[k, size)``."""
        root = self.find(atom)
        size = self.size[root]
        if not 0 < k < size or self.children[atom] is not None:  # pragma: no cover
            raise AssertionError("bad split")
        reasons = list(self._reasons[root])
        members = self._members.pop(root)
        del self._reasons[root]
        los, his = [], []
        for m in members:
            lo, hi = self.new(k), self.new(size - k)
            self.children[m] = (lo, hi)
            los.append(lo)
            his.append(hi)
        for group in (los, his):
            for other in group[1:]:
                self.union(group[0], other)
            self._reasons[self.find(group[0])] = list(reasons)

    def leaves(self, atom: int) -> list[int]:
        out: list[int] = []
        stack = [atom]
        while stack:
            a = stack.pop()
            kids = self.children[a]
            if kids is None:
                out.append(a)
            else:
                stack.extend((kids[1], kids[0]))
        return out

    # ---- layouts -------------------------------------------------------------------------
    def expand(self, layout: Layout) -> Layout:
        """The layout in terms of current leaf atoms."""
        return tuple((leaf, b) for a, b in layout for leaf in self.leaves(a))

    def pieces(self, layout: Layout) -> list[tuple[int, int, int]]:
        """``(leaf atom, start index, block)`` for each piece of the expanded layout."""
        out = []
        start = 0
        for a, b in self.expand(layout):
            out.append((a, start, b))
            start += self.size[a] * b
        return out

    def cut_at(self, layout: Layout, index: int) -> bool:
        """Make ``index`` a piece boundary of ``layout`` (splitting a class if needed).

        False when the index falls inside a block (a channel would be cut in half).
        """
        for a, start, b in self.pieces(layout):
            end = start + self.size[a] * b
            if start < index < end:
                if (index - start) % b:
                    return False
                self.split(a, (index - start) // b)
                return True
        return True

    def sub(self, layout: Layout, start: int, stop: int) -> Layout | None:
        """The pieces covering ``[start, stop)``, or None if a boundary splits a block."""
        if not (self.cut_at(layout, start) and self.cut_at(layout, stop)):
            return None
        return tuple((a, b) for a, s, b in self.pieces(layout) if start <= s < stop)

    def unify(self, first: Layout, second: Layout) -> bool:
        """Merge two layouts index by index. False (and nothing merged) if they cannot align."""
        if layout_length(self, first) != layout_length(self, second):
            return False
        while True:
            changed = False
            for this, other in ((first, second), (second, first)):
                for _, start, _ in self.pieces(this)[1:]:
                    before = len(self.parent)
                    if not self.cut_at(other, start):
                        return False
                    changed |= len(self.parent) != before
            if not changed:
                break
        p1, p2 = self.pieces(first), self.pieces(second)
        if len(p1) != len(p2) or any(b1 != b2 for (_, _, b1), (_, _, b2) in zip(p1, p2)):
            return False
        for (a1, _, _), (a2, _, _) in zip(p1, p2):
            self.union(a1, a2)
        return True

    def freeze_layout(self, layout: Layout, reason: str) -> None:
        for a, _ in layout:
            self.freeze(a, reason)

    def roots(self, layouts: Iterable[Layout]) -> set[int]:
        return {self.find(a) for layout in layouts for a, _ in self.expand(layout)}
