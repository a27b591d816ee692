"""The registry of compressed-model candidates the runner compares with ``fp32``.

A candidate is a name and a ``build(model_path, calib_source, out_path)`` callable that writes the
compressed model to ``out_path`` (a ``.onnx`` file; external data next to it is counted in the
size).  ``calib_source`` is an ``.npz`` file whose keys are the model's input names and whose axis 0
indexes samples; ``onnxcomp.data.Dataset(calib_source, model)`` reads it as batch-1 feeds.  The
callable may return a dict of notes (strings or numbers) that end up in the results.

Each build runs in its own child process (see ``benchmarks/worker.py``), so its wall time and peak
memory are its own and a crash is a row, not the end of the run.

To add onnxcomp's own recipes, write a module that calls :func:`register` and list it in
``PLUGIN_MODULES``; the runner needs no change::

    from benchmarks.candidates import Candidate, register

    def _build(model_path, calib_source, out_path):
        ...  # load, compress, onnxcomp.io.save_model(model, out_path)

    register(Candidate("onnxcomp_int8", _build, kind="onnxcomp", description="..."))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BuildFn = Callable[[Path, Path, Path], "dict | None"]

#: Modules that register candidates when imported, in order (the table keeps this order).
PLUGIN_MODULES: tuple[str, ...] = ("benchmarks.baselines", "benchmarks.onnxcomp_candidates")


@dataclass(frozen=True)
class Candidate:
    name: str
    build: BuildFn
    kind: str  # "ort-static", "ort-dynamic", "onnxcomp", ...
    description: str = ""
    #: Suite models this candidate is not attempted on (it is not a failure, just not applicable).
    skip_models: tuple[str, ...] = ()
    #: Everything that decides what ``build`` writes besides the code (a recipe, quantizer
    #: settings), JSON-ready: part of the build cache key, so a changed setting rebuilds.
    config: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def is_ort_baseline(self) -> bool:
        return self.kind.startswith("ort")


CANDIDATES: dict[str, Candidate] = {}
_loaded = False


def register(candidate: Candidate) -> Candidate:
    if candidate.name in CANDIDATES or candidate.name == "fp32":
        raise ValueError(f"candidate {candidate.name!r} is already registered")
    CANDIDATES[candidate.name] = candidate
    return candidate


def load_candidates() -> dict[str, Candidate]:
    """Import every plug-in module once and return the registry."""
    global _loaded
    if not _loaded:
        for mod in PLUGIN_MODULES:
            importlib.import_module(mod)
        _loaded = True
    return CANDIDATES
