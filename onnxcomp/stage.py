"""The one way through: a :class:`Stage` acts in place on a working copy inside a :class:`Context`.

Every command takes the same path: ``compress`` runs a recipe's stages in registry order
(:data:`onnxcomp.recipe.STAGE_CLASSES`) on **one** working copy of the input model; ``quantize``,
``prune`` and ``cluster`` are thin wrappers (a working copy and one stage). A stage declares

* ``config_class``: its frozen, validated config (a recipe table is parsed into it);
* ``required_opset(config)``: the lowest default-domain opset it writes (the working copy is
  upgraded once, before any stage runs, to the highest of these, when allowed);
* ``needs_data(config)``: whether it calibrates or fits on data (``ctx.fit_data``);
* ``run(work, ctx) -> stats``: the rewrite, in place on ``work``; its statistics go into the
  report's ``stages`` list, or into ``ctx.report[section]`` when the stage sets ``section``
  (``measure`` does; a held-out ``check`` stage would).

The :class:`Context` owns what stages share: the untouched input model (``reference``), the data
splits (``fit_data``: what stages calibrate and fit on; ``check_data``: held out, for measuring the
result), labels of the check data, progress, notes, and ``report`` sections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError
from onnxcomp.passes.base import PassConfig
from onnxcomp.selection import unmatched_entries

__all__ = ["Progress", "Context", "Stage", "note_constant_calibration", "selection_for"]

#: ``progress(stage, done, total)``
Progress = Callable[[str, int, "int | None"], object]


@dataclasses.dataclass
class Context:
    """What the stages of one run share (see the module docstring)."""

    #: the input model, never modified
    reference: ir.Model
    #: data the stages calibrate and fit on
    fit_data: Dataset | None = None
    #: held-out data for measuring the result (None: none given)
    check_data: Dataset | None = None
    #: integer labels of ``check_data``
    labels: np.ndarray | None = None
    allow_upgrade: bool = True
    progress: Progress | None = None
    #: feeds for latency measurement (None: taken from the data)
    latency_feeds: list[dict[str, np.ndarray]] | None = None
    #: intra-op threads of latency measurements and latency-driven decisions (None: onnxruntime's
    #: default, one per physical core)
    threads: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: report sections stages add by name (``measure``, ``check``, ...)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: names of the stages that have run, in order
    done: list[str] = dataclasses.field(default_factory=list)
    #: the :class:`onnxcomp.check.CheckConfig` of the run's held-out check (None: the default budget),
    #: whose rule a stage that bounds its own damage judges by (a prune target's combined cut)
    check: Any = None

    def progress_for(self, stage: str) -> Callable[[int, int | None], object] | None:
        """``progress(done, total)`` for one stage, or None without a progress callback."""
        if self.progress is None:
            return None
        report = self.progress
        return lambda done, total: report(stage, done, total)

    @property
    def cleaned(self) -> bool:
        """Whether the cleanup stage has run on the working copy (later stages skip their own)."""
        return "cleanup" in self.done


class Stage:
    """Base of the stages (the protocol in the module docstring); one config per instance."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PassConfig]] = PassConfig
    #: report key for the stage's stats instead of the ``stages`` list (None: the list)
    section: ClassVar[str | None] = None

    def __init__(self, config: PassConfig | None = None) -> None:
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"stage {self.name!r} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def required_opset(cls, config: PassConfig) -> int:
        """The lowest default-domain opset the stage writes with ``config``."""
        return 1

    @classmethod
    def needs_data(cls, config: PassConfig) -> bool:
        """Whether the stage needs ``ctx.fit_data`` with ``config``."""
        return False

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:  # pragma: no cover - abstract
        """Rewrite ``work`` in place; return the stage's statistics."""
        raise NotImplementedError


def selection_for(model: ir.Model, config: Any, notes: list[str], stage: str = "") -> Any:
    """``config`` as it applies to ``model`` (:func:`exclude_renamed_copies`), with a note for each
    of its ``exclude`` / ``op_types`` entries that selects nothing there
    (:func:`note_unmatched_selection`): what every command does with a stage's config before any work."""
    config = exclude_renamed_copies(model, config)
    note_unmatched_selection(model, config, notes, stage)
    return config


def exclude_renamed_copies(model: ir.Model, config: Any) -> Any:
    """``config`` with each ``exclude`` entry that names a node name several nodes of one graph had
    (renamed on load: :func:`onnxcomp.io.renamed_nodes`) followed by the copies' new names, so that
    the entry excludes every node the user's model called so; ``config`` itself when none does."""
    from onnxcomp.io import renamed_nodes

    renamed = renamed_nodes(model)
    exclude = tuple(getattr(config, "exclude", ()) or ())
    copies = tuple(new for entry in exclude for new in renamed.get(entry, ()) if new not in exclude)
    return dataclasses.replace(config, exclude=exclude + copies) if copies else config


def note_unmatched_selection(model: ir.Model, config: Any, notes: list[str], stage: str = "") -> None:
    """Say in ``notes`` which entries of ``config.exclude`` match no node name, op type or tensor
    name anywhere in ``model`` (subgraphs included), and which of ``config.op_types`` no node has:
    such an entry changes nothing, and is most often a typo the user should hear about."""
    exclude = tuple(getattr(config, "exclude", ()) or ())
    op_types = tuple(getattr(config, "op_types", ()) or ())
    if not exclude and not op_types:
        return
    nodes = list(model.graph.all_nodes())
    types = {n.op_type for n in nodes}
    names = {n.name for n in nodes if n.name} | types
    for node in nodes:
        names.update(v.name for v in (*node.inputs, *node.outputs) if v is not None and v.name)
    names.update(v.name for v in model.graph.inputs if v.name)
    where = f"{stage}: " if stage else ""
    for entry in unmatched_entries(exclude, names):
        notes.append(f"{where}exclude {entry!r} matches no node name, op type or tensor name of this model: it excludes nothing")
    for entry in unmatched_entries(op_types, types):
        notes.append(f"{where}op type {entry!r} is not in this model: it selects nothing")


def note_constant_calibration(data: Dataset | None, report: dict[str, Any], notes: list[str]) -> None:
    """When every float input of the calibration data held one value in every feed the stages
    read (all ones, all zeros: :meth:`Dataset.constant_inputs`), say so in ``notes`` and in
    ``report["calibration"]["constant_inputs"]``: ranges, refits and Hessians fitted on it fit that
    input only. Called once per calibrating entry point (``quantize``, ``prune``, ``compress``),
    after its stages, on the Dataset they all read (``ctx.fit_data``)."""
    constant = data.constant_inputs() if isinstance(data, Dataset) else None
    if not constant:
        return
    report.setdefault("calibration", {})["constant_inputs"] = constant
    values = ", ".join(f"{name!r} = {value:g}" for name, value in constant.items())
    notes.append(f"the calibration data holds one value per input in every feed ({values}): what was fitted on "
                 "it fits that input only, and the model will be wrong on real data; calibrate on real samples")
