"""The stage loop of ``compress``: one working copy, cleanup once, sessions only where needed.

Counts are taken by wrapping ``onnx_ir.Model.clone``, ``onnxruntime.InferenceSession`` and
``CleanupPass.apply`` for one prune-cluster-int8 and one deep-compression run on the shipped
digits CNN.
"""

from __future__ import annotations

import collections
import dataclasses
import traceback

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import MODELS

from onnxcomp import recipe as recipe_module
from onnxcomp.compress import compress
from onnxcomp.passes.base import PassConfig
from onnxcomp.passes.cleanup import CleanupPass
from onnxcomp.recipe import STAGE_CLASSES, STAGES, Recipe, load_recipe, register_stage
from onnxcomp.stage import Context, Stage

#: modules allowed to open an onnxruntime session in a compress run, and why
SESSION_OWNERS = {
    "onnxcomp/graph.py": "calibration and fitting statistics (stream_values)",
    "onnxcomp/prune/reconstruct.py": "least-squares refit of pruned layers",
    "onnxcomp/prune/frontier.py": "the streamed least-squares refit, one sub-model per stage",
    "onnxcomp/measure/fidelity.py": "fidelity measurement",
    "onnxcomp/measure/stages.py": "the verify stage loads the result",
    "onnxcomp/quant/verify.py": "int8 kernel count in onnxruntime's optimized graph",
    "onnxcomp/passes/base.py": "the output check of passes onnxruntime must judge (prune, cluster)",
    "onnxcomp/quant/kernels.py": "the once-per-process probe of the CPU's int8 kernels",
}


def _caller(skip: set[str]) -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/onnxcomp/" in path:
            rel = "onnxcomp/" + path.rsplit("/onnxcomp/", 1)[1]
            if rel not in skip:
                return rel
    return "?"


def _count(monkeypatch) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Count clones, sessions (and who opens them) and cleanup runs from here on."""
    counts: collections.Counter[str] = collections.Counter()
    session_callers: collections.Counter[str] = collections.Counter()
    clone, session, apply = ir.Model.clone, ort.InferenceSession, CleanupPass.apply

    def counted_clone(self, *args, **kwargs):
        # the streamed refit builds each stage's sub-model from a structural copy whose tensors
        # are shared and which lives for that stage only: counted apart
        sub = _caller({"onnxcomp/io.py"}) == "onnxcomp/prune/frontier.py"
        counts["refit submodel" if sub else "clone"] += 1
        return clone(self, *args, **kwargs)

    def counted_session(*args, **kwargs):
        counts["session"] += 1
        session_callers[_caller({"onnxcomp/runtime.py", "onnxcomp/io.py"})] += 1
        return session(*args, **kwargs)

    def counted_cleanup(self, model):
        counts["cleanup"] += 1
        return apply(self, model)

    monkeypatch.setattr(ir.Model, "clone", counted_clone)
    monkeypatch.setattr(ort, "InferenceSession", counted_session)
    monkeypatch.setattr(CleanupPass, "apply", counted_cleanup)
    return counts, session_callers


def test_prune_cluster_int8_clones_once_cleans_once(monkeypatch):
    counts, session_callers = _count(monkeypatch)
    recipe = load_recipe("prune-cluster-int8").with_overrides({"measure.latency": False})
    work, report = compress(MODELS / "digits_cnn.onnx", recipe, MODELS / "digits_calib.npz",
                            eval_data=MODELS / "digits_eval.npz")
    assert [s["stage"] for s in report["stages"]] == ["cleanup", "prune", "cluster", "quantize", "verify"]
    assert counts["cleanup"] == 1, counts
    # the working copy, cleanup's rollback snapshot of its input (tensors shared), the float
    # reference of the least-squares refit, a typed copy of the input model for per-layer fidelity
    assert counts["clone"] <= 4, counts
    assert set(session_callers) <= set(SESSION_OWNERS), session_callers
    assert "cleanup" not in report["stages"][3]["stats"]  # quantize did not clean up again
    assert report["after"]["bytes"] < report["before"]["bytes"] / 2
    sqnr = report["measure"]["fidelity"]["outputs"][0]["sqnr_db"]
    assert sqnr > 10, f"prune-cluster-int8 on the digits CNN: {sqnr:.1f} dB"


def test_deep_compression_three_clones_one_cleanup(monkeypatch):
    """The deep-compression recipe: the working copy, cleanup's rollback snapshot and the float
    reference of the sparsity refit are the only clones (per-layer fidelity exposes the
    intermediates of both models in place, untyped ones included)."""
    counts, session_callers = _count(monkeypatch)
    recipe = load_recipe("deep-compression").with_overrides({"measure.latency": False})
    work, report = compress(MODELS / "digits_cnn.onnx", recipe, MODELS / "digits_calib.npz",
                            eval_data=MODELS / "digits_eval.npz")
    assert [s["stage"] for s in report["stages"]] == ["cleanup", "sparsity", "cluster", "verify"]
    assert counts["cleanup"] == 1, counts
    assert counts["clone"] <= 3, counts
    assert set(session_callers) <= set(SESSION_OWNERS), session_callers
    fidelity = report["measure"]["fidelity"]
    assert len(fidelity["layers"]) > 10  # the per-layer ranking is still there without typed clones
    assert report["after"]["bytes"] < report["before"]["bytes"] / 3
    sqnr = fidelity["outputs"][0]["sqnr_db"]
    assert sqnr > 10, f"deep-compression on the digits CNN: {sqnr:.1f} dB"


def test_exposed_outputs_untyped_values_without_a_copy():
    """graph.exposed appends untyped intermediates as they are (onnxruntime infers their types)
    and takes them away again; their values are the model's own."""
    from onnxcomp.graph import exposed, produced_values
    from onnxcomp.io import load_model
    from onnxcomp.runtime import create_session, session_options

    model = load_model(MODELS / "digits_mlp.onnx")
    values = produced_values(model)
    outputs = [v.name for v in model.graph.outputs]
    names = [n for n in values if n not in outputs]
    assert names and all(values[n].dtype is None for n in names)  # as loaded: intermediates untyped
    feed = {"image": np.load(MODELS / "digits_eval.npz")["image"][:8]}
    for level in ("disable", "all"):
        plain = create_session(model, sess_options=session_options(level)).run(None, feed)
        with exposed(model, names) as exposing:
            assert exposing is model
            got = create_session(exposing, sess_options=session_options(level)).run(None, feed)
        np.testing.assert_allclose(got[0], plain[0], rtol=1e-5, atol=1e-5)
        assert len(got) == len(outputs) + len(names) and all(a.dtype == np.float32 for a in got)
    assert [v.name for v in model.graph.outputs] == outputs
    with pytest.raises(Exception, match="not produced by a node"):
        with exposed(model, ["no_such_tensor"]):
            pass


class _HeldOutCheck(Stage):
    """A stand-in for a held-out check: top-1 agreement of the working copy on ctx.check_data."""

    name = "check"

    @dataclasses.dataclass(frozen=True)
    class Config(PassConfig):
        min_agreement: float = 0.5

    config_class = Config
    section = "check"

    def run(self, work, ctx: Context):
        from onnxcomp.runtime import run_model

        feeds = list(ctx.check_data)[:4]
        ref = np.concatenate([o[0] for o in run_model(ctx.reference, feeds)]).argmax(-1)
        got = np.concatenate([o[0] for o in run_model(work, feeds)]).argmax(-1)
        agreement = float(np.mean(ref == got))
        return {"agreement": agreement, "met": agreement >= self.config.min_agreement, "after": list(ctx.done)}


def test_registry_takes_a_check_stage(monkeypatch):
    """A stage registered after verify runs there, reads ctx.check_data and adds a report section."""
    monkeypatch.setattr(recipe_module, "STAGE_CLASSES", dict(STAGE_CLASSES))
    monkeypatch.setattr(recipe_module, "STAGES", dict(STAGES))
    import onnxcomp.compress as compress_module

    monkeypatch.setattr(compress_module, "STAGE_CLASSES", recipe_module.STAGE_CLASSES)
    recipe_module.register_stage(_HeldOutCheck, after="verify")
    assert list(recipe_module.STAGE_CLASSES) == ["cleanup", "prune", "sparsity", "cluster", "quantize", "verify", "check",
                                                 "measure"]
    recipe = Recipe.from_dict({"name": "t", "cleanup": {}, "quantize": {}, "verify": {}, "check": {"min_agreement": 0.9}})
    reference = MODELS / "digits_cnn.onnx"
    _, report = compress(reference, recipe, MODELS / "digits_calib.npz", eval_data=MODELS / "digits_eval.npz")
    assert report["check"]["after"] == ["cleanup", "quantize", "verify"]
    assert report["check"]["met"] and report["check"]["agreement"] >= 0.9, report["check"]
    with pytest.raises(ValueError, match="no stage 'nope'"):
        register_stage(_HeldOutCheck, after="nope")


def test_stage_opsets_come_from_the_stages():
    from onnxcomp.cluster.passes import ClusterConfig

    assert STAGE_CLASSES["cluster"].required_opset(ClusterConfig(bits=4, format="codebook")) == 21
    assert STAGE_CLASSES["cluster"].required_opset(ClusterConfig(bits=5, format="float")) == 1
    assert STAGE_CLASSES["quantize"].required_opset(STAGES["quantize"]()) == 13


def test_context_progress_names_the_stage():
    seen = []
    ctx = Context(reference=ir.Model(ir.Graph([], [], nodes=[]), ir_version=10),
                  fit_data=None, progress=lambda *a: seen.append(a))
    ctx.progress_for("prune")(1, 2)
    assert seen == [("prune", 1, 2)]
    assert Context(reference=ctx.reference).progress_for("x") is None
