"""Configuration of structured pruning (frozen, validated on construction)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from onnxcomp.errors import ConfigError
from onnxcomp.passes.base import PassConfig
from onnxcomp.prune.importance import IMPORTANCES
from onnxcomp.selection import NodeSelector

__all__ = ["PruneConfig"]


@dataclasses.dataclass(frozen=True)
class PruneConfig(PassConfig):
    """What to prune and how.

    Attributes:
        criterion: ``zeros`` (channels whose producer weights are exactly zero, as a training
            framework's structured pruning leaves them; exact), ``l1`` / ``l2`` (weight magnitude
            summed over every producer and consumer slice of the coupled group), ``bn``
            (BatchNorm |gamma|), ``activation`` (mean |activation| on calibration data), or any
            other importance registered in :mod:`onnxcomp.prune.importance`.
        ratio: fraction of each group's channels to remove (ignored by ``zeros``).
        scope: ``layer`` removes ``ratio`` of every group; ``global`` ranks all channels of all
            groups together by their score normalized by the group's mean score.
        round_to: channel counts kept are multiples of this (odd counts can be slower).
        min_channels: never keep fewer channels in a group.
        exclude: groups touching a node (by name, op type or ``re:PATTERN``) stay whole.
        reconstruct: refit the consumers by least squares on calibration data after cutting.
        ridge: relative ridge of the least-squares refit.
        fold_border: fold a constant removed channel into a zero-padded Conv consumer's bias even
            though the border pixels then differ (reported); otherwise such channels are kept.
        max_samples: use at most this many calibration feeds.
    """

    criterion: str = "l1"
    ratio: float = 0.3
    scope: Literal["layer", "global"] = "layer"
    round_to: int = 1
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    reconstruct: bool = False
    ridge: float = 1e-3
    fold_border: bool = False
    max_samples: int | None = None

    def validate(self) -> None:
        if self.criterion not in IMPORTANCES:
            raise ConfigError(f"prune: criterion must be one of {', '.join(map(repr, IMPORTANCES))}, got {self.criterion!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"prune: ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise ConfigError(f"prune: round_to must be >= 1, got {self.round_to}")
        if self.min_channels < 1:
            raise ConfigError(f"prune: min_channels must be >= 1, got {self.min_channels}")
        if self.ridge < 0:
            raise ConfigError(f"prune: ridge must be >= 0, got {self.ridge}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"prune: max_samples must be >= 1, got {self.max_samples}")
        NodeSelector((), self.exclude)

    @property
    def needs_data(self) -> bool:
        return IMPORTANCES[self.criterion].needs_data or self.reconstruct
