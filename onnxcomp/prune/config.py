"""Configuration of structured pruning (frozen, validated on construction)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from onnxcomp.bounds import Range
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
        target_latency / target_params / target_macs: instead of ``ratio``, remove channels until
            the model keeps this fraction of its measured latency (onnxruntime on this CPU, against
            the unpruned model side by side), of its parameters or of its MACs, with per-group
            ratios that cost the least damage (:mod:`onnxcomp.prune.budget`); needs ``criterion``
            ``obs`` and calibration data. At most one target.
        latency_threads: onnxruntime intra-op threads for the latency measurements (None: default).
        latency_proxy: how a latency target predicts each group's saving before the measured
            rounds correct it: ``macs`` (MACs of the linear nodes plus the elements of the
            activations the group carries; nothing timed) or ``nodes`` (each linear node timed
            alone in onnxruntime at its real shape and at 1/4, 1/2, 3/4 of the group cut).
        max_damage: with a target, never cut beyond this summed predicted damage (relative output
            error, :mod:`onnxcomp.prune.budget`); a target out of reach within it is refused
            (an error naming the fraction that can be reached), not met by cutting everything.
            The combined cut is also measured on the fitting data (each round; with
            ``reconstruct`` the refitted model), and a cut measured above the bound is backed off
            (the target then reported as not reached). None: no bound. It stays a second bound
            beside ``check_rule`` (default 0.1): measured on the TCN and the digits CNN and MLP
            (nine targets, with and without the refit), the rule held the cut first every time
            and 0.1 against no bound changed no written model; what it keeps is the cap of the
            path the rounds search by the *predicted* damage, hence the refusal (exit 1) of a
            target far out of reach (digits CNN ``--target-macs 0.5`` without the refit: refused,
            where without the bound a model keeping 0.957 of the MACs is written with a note);
            and it bounds a model whose outputs the rule reads coarsely (benchmarks/RESULTS.md,
            fourteenth session).
        check_rule: with a target, also judge the combined cut on the fitting data by the held-out
            check's own per-output rule (:mod:`onnxcomp.check`: cosine >= ``min_cosine`` for
            values, top-1 agreement >= ``min_agreement`` for class scores, ...; the
            :class:`~onnxcomp.check.CheckConfig` the run's check uses) and back off while it
            fails, as for ``max_damage`` (:class:`onnxcomp.prune.targets.DamageProbe`).
        sensitivity: with a target, ``measured`` rescales each group's damage curve to the model
            output damage measured on calibration data with about half the group cut alone, as
            the written model will have it (with ``reconstruct`` its consumers refitted, without
            it the removed channels' means folded); ``local`` uses the consumers' refit error as it is.
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
    target_latency: float | None = None
    target_params: float | None = None
    target_macs: float | None = None
    latency_threads: int | None = None
    latency_proxy: Literal["macs", "nodes"] = "macs"
    max_damage: float | None = 0.1
    check_rule: bool = True
    sensitivity: Literal["measured", "local"] = "measured"

    stage: ClassVar[str] = "prune"
    ranges: ClassVar[dict[str, Range]] = {
        "ratio": Range(float, 0.0, 1.0, max_open=True),
        "round_to": Range(int, 1, 1 << 16),
        "min_channels": Range(int, 1),
        "ridge": Range(float, 0.0, 1e6),
        "max_samples": Range(int, 1),
        "target_latency": Range(float, 0.0, 1.0, min_open=True),
        "target_params": Range(float, 0.0, 1.0, min_open=True),
        "target_macs": Range(float, 0.0, 1.0, min_open=True),
        "latency_threads": Range(int, 1, 1024),
        "max_damage": Range(float, 0.0, 1e6, min_open=True),
    }

    def validate(self) -> None:
        if self.criterion not in IMPORTANCES:
            raise ConfigError(f"prune: criterion must be one of {', '.join(map(repr, IMPORTANCES))}, got {self.criterion!r}")
        NodeSelector((), self.exclude)
        given = [k for k, v in self.targets().items() if v is not None]
        if len(given) > 1:
            raise ConfigError(f"prune: give at most one target, got {', '.join(given)}")
        if given and self.criterion != "obs":
            raise ConfigError(f"prune: {given[0]} allocates ratios from the obs damage curves; "
                              f"use criterion 'obs' (got {self.criterion!r})")

    def targets(self) -> dict[str, float | None]:
        return {"target_latency": self.target_latency, "target_params": self.target_params,
                "target_macs": self.target_macs}

    @property
    def target(self) -> tuple[str, float] | None:
        """(``latency``/``params``/``macs``, fraction kept) or None."""
        for k, v in self.targets().items():
            if v is not None:
                return k.removeprefix("target_"), v
        return None

    @property
    def needs_data(self) -> bool:
        return IMPORTANCES[self.criterion].needs_data or self.reconstruct
