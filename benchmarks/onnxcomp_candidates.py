"""onnxcomp's own candidates for the benchmark suite (recipes and pass configurations).

Every build goes through onnxcomp's public API (``compress`` with a recipe mapping, or
``quantize``/``cluster``) on the suite's calibration file, exactly as a user would, and writes the
model with ``onnxcomp.io.save_model``. Notes carry what the tool itself reports (int8 kernels that
onnxruntime fused, nodes kept float, zipped size and entropy-coding estimate of clustered weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.candidates import Candidate, register

CNNS = ("digits_cnn", "ppocr_det", "ppocr_rec", "ppocr_cls")
MATMUL_MODELS = ("digits_mlp", "digits_transformer", "minilm")
ALL = CNNS + MATMUL_MODELS


def _others(*keep: str) -> tuple[str, ...]:
    return tuple(m for m in ALL if m not in keep)


def _compress(model_path: Path, calib: Path | None, out_path: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    from onnxcomp.compress import compress
    from onnxcomp.data import Dataset
    from onnxcomp.io import load_model, save_model

    model = load_model(model_path)
    data = Dataset(calib, model) if calib is not None else None
    recipe = {"name": "bench", **recipe}
    compressed, report = compress(model, recipe, data)
    save_model(compressed, out_path)
    notes = _notes(report)
    if "sparsity" in recipe:  # the size route: the whole file, zipped, beside
        import zlib

        notes["file_zipped_kb"] = round(len(zlib.compress(out_path.read_bytes(), 9)) / 1024, 1)
    return notes


def _notes(report: dict[str, Any]) -> dict[str, Any]:
    notes: dict[str, Any] = {}
    for stage in report["stages"]:
        stats = stage["stats"]
        if stage["stage"] == "quantize":
            ort = stats.get("onnxruntime") or {}
            if ort:
                notes["int8_kernels"] = ort["int8_kernels"]
                notes["float_compute_left"] = ort["float_compute"]
            fb = stats.get("fallback")
            if fb:
                notes["nodes_kept_float"] = len(fb["float_nodes"])
                notes["calib_sqnr_db"] = round(fb["final"]["sqnr_db"], 2)
                lat = fb.get("latency") or {}
                if lat.get("op_types_kept_float"):
                    notes["op_types_float_for_speed"] = ",".join(lat["op_types_kept_float"])
                if lat.get("int8_slower_than_float"):
                    notes["int8_slower_than_float"] = "yes"
        elif stage["stage"] == "prune":
            notes["channels_removed"] = stats["channels_removed"]
            notes["macs_ratio"] = round(stats["after"]["macs"] / max(stats["before"]["macs"], 1), 3)
            notes["params_ratio"] = round(stats["after"]["parameters"] / max(stats["before"]["parameters"], 1), 3)
        elif stage["stage"] == "cluster":
            t = stats["totals"]
            notes["clustered_tensors"] = len(stats["tensors"])
            notes["weights_kb"] = round(t["bytes_before"] / 1024, 1)
            notes["zipped_kb"] = round(t["zlib_bytes_after"] / 1024, 1)
            notes["entropy_kb"] = round(t["entropy_bytes"] / 1024, 1)
            notes["stored_kb"] = round(t["bytes_after"] / 1024, 1)
            if "storage" in t:
                notes["label_storage"] = t["storage"]["storage"]
        elif stage["stage"] == "sparsity":
            notes["sparsity"] = round(stats["totals"]["sparsity"], 3)
    for note in report.get("notes", []):
        notes.setdefault("notes", note)
    return notes


def _recipe_candidate(name: str, description: str, recipe: dict[str, Any], *, skip: tuple[str, ...] = (),
                      needs_data: bool = True) -> None:
    def build(model_path: Path, calib: Path, out_path: Path) -> dict[str, Any]:
        return _compress(model_path, calib if needs_data else None, out_path, recipe)

    register(Candidate(name, build, kind="onnxcomp", description=description, skip_models=skip,
                       config={"recipe": recipe, "calibration_data": needs_data}))


STATIC = {"cleanup": {}, "verify": {}}

_recipe_candidate("oc_int8", "onnxcomp static int8: uint8 activations, min/max, per-channel weights",
                  {**STATIC, "quantize": {"calibration": "minmax"}})
_recipe_candidate("oc_int8_pct", "onnxcomp static int8, percentile 99.999 ranges",
                  {**STATIC, "quantize": {"calibration": "percentile"}})
_recipe_candidate("oc_int8_mse", "onnxcomp static int8, MSE-optimal ranges (recipe int8-accurate)",
                  {**STATIC, "quantize": {"calibration": "mse"}})
_recipe_candidate("oc_int8_acc", "onnxcomp int8-accurate: MSE ranges + cross-layer equalization + bias correction",
                  {**STATIC, "quantize": {"calibration": "mse", "equalize": True, "bias_correction": True}})
_recipe_candidate("oc_int8_sq", "onnxcomp int8 + SmoothQuant (alpha searched) + bias correction",
                  {**STATIC, "quantize": {"smoothquant": True, "bias_correction": True}}, skip=CNNS)
_recipe_candidate("oc_int8_fb30", "onnxcomp int8 with float fallback to 30 dB output SQNR (calibration data), latency-aware",
                  {**STATIC, "quantize": {"fidelity_target": 30.0, "latency_aware": True}})
_recipe_candidate("oc_int8_fb40", "onnxcomp int8 with float fallback to 40 dB output SQNR (calibration data), latency-aware",
                  {**STATIC, "quantize": {"fidelity_target": 40.0, "latency_aware": True}})
_recipe_candidate("oc_dynamic", "onnxcomp dynamic int8 (MatMul/Gemm)",
                  {**STATIC, "quantize": {"mode": "dynamic"}}, skip=CNNS, needs_data=False)
_recipe_candidate("oc_int4_ort", "onnxcomp weight-only int4, block 32, MatMulNBits (recipe transformer-int4)",
                  {**STATIC, "quantize": {"mode": "weight-only", "bits": 4, "block_size": 32, "weight_only_format": "ort"}},
                  skip=CNNS, needs_data=False)
_recipe_candidate("oc_int4_gptq", "onnxcomp weight-only int4, block 32, MatMulNBits, GPTQ rounding (act-order) "
                  "on the calibration data, 8-bit embedding tables",
                  {**STATIC, "quantize": {"mode": "weight-only", "bits": 4, "block_size": 32, "weight_only_format": "ort",
                                          "rounding": "gptq", "gptq_act_order": True, "embedding_bits": 8}},
                  skip=CNNS)
for bits in (8, 5, 4, 3):
    _recipe_candidate(f"oc_cluster{bits}", f"onnxcomp {bits}-bit k-means weight sharing (channel scales auto), "
                      "codebook storage",
                      {**STATIC, "cluster": {"bits": bits, "format": "codebook", "min_elements": 256}},
                      needs_data=False)
    _recipe_candidate(f"oc_cluster{bits}s", f"onnxcomp {bits}-bit k-means weight sharing, one scale per channel, "
                      "codebook storage",
                      {**STATIC, "cluster": {"bits": bits, "format": "codebook", "min_elements": 256,
                                             "channel_scales": "always"}},
                      needs_data=False)
for ratio in (30, 50):
    for rec in (False, True):
        prune = {"criterion": "l1", "ratio": ratio / 100, "round_to": 4, "reconstruct": rec, "max_samples": 32}
        _recipe_candidate(
            f"oc_prune{ratio}{'_rec' if rec else ''}",
            f"onnxcomp structured pruning {ratio}% (L1){' + least-squares refit' if rec else ''}",
            {**STATIC, "prune": prune}, skip=_others("digits_cnn", "ppocr_det"),
        )
_recipe_candidate(
    "oc_deep", "onnxcomp prune-cluster-int8 chain (speed route): structured prune 30% + refit, 5-bit sharing, static int8",
    {**STATIC, "prune": {"criterion": "l1", "ratio": 0.3, "round_to": 4, "reconstruct": True, "max_samples": 32},
     "cluster": {"bits": 5, "format": "float", "min_elements": 256}, "quantize": {}},
    skip=_others("digits_cnn", "digits_mlp", "ppocr_det"),
)
_recipe_candidate(
    "oc_deep_sparse", "onnxcomp recipe deep-compression (size route): unstructured sparsity 80% (conv 60%, >= 6 "
    "inputs kept per output) + refit with 3-bit sharing layer by layer (output layers up to 4), int8 codebooks, sparse label storage in one "
    "stream, float16 biases, compacted graph",
    {**STATIC, "sparsity": {"ratio": 0.8, "conv_ratio": 0.6, "refit": True, "max_samples": 256, "min_elements": 128,
                            "min_inputs_kept": 6, "share_bits": 3, "share_bits_max": 4, "share_tolerance": 2.0},
     "cluster": {"bits": 4, "format": "sparse", "min_elements": 128, "codebook_int8": True, "float16_biases": True,
                 "compensate": True, "max_samples": 256, "compact_graph": True}},
    skip=_others("digits_cnn", "digits_mlp", "ppocr_rec"),
)
_recipe_candidate(
    "oc_deep_sparse_mag", "onnxcomp size route without data: magnitude sparsity 80% (conv 60%), 4-bit sharing, "
    "sparse label storage",
    {**STATIC, "sparsity": {"ratio": 0.8, "conv_ratio": 0.6},
     "cluster": {"bits": 4, "format": "sparse", "min_elements": 256}},
    skip=_others("digits_cnn", "digits_mlp", "ppocr_rec"), needs_data=False,
)


def _quantize_cli(model_path: Path, calib: Path, out_path: Path) -> dict[str, Any]:
    """``onnxcomp quantize MODEL -o OUT --calibration C`` as a user types it (the check holds out
    every 5th feed and the automatic fallback may follow), in this process."""
    import contextlib
    import io
    import json

    from onnxcomp.cli import main

    argv = ["quantize", str(model_path), "-o", str(out_path), "--calibration", str(calib), "--json", "--force",
            "--no-latency"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(argv)
    if status not in (0, 3):
        raise RuntimeError(f"onnxcomp quantize exited {status}")
    report = json.loads(stdout.getvalue())
    check = report.get("check") or {}
    from onnxcomp.quant.cli import branch_int8_nodes

    # the main graph's int8 nodes and those inside If branches (silero-vad quantizes only there)
    int8 = int(report.get("int8_nodes") or 0) + branch_int8_nodes(report.get("branches") or {})
    notes: dict[str, Any] = {"int8_nodes": int8, "check_met": check.get("met"),
                             "fit_feeds": (check.get("data") or {}).get("fit_feeds")}
    auto = report.get("auto_fallback")
    if auto:
        notes["fallback"] = "gave up" if not auto["met_on_fitting_data"] else f"{len(auto['float_nodes'])} nodes float"
    return notes


register(Candidate("oc_quantize_cli", _quantize_cli, kind="onnxcomp",
                   description="onnxcomp quantize with every default, as typed: fits on 4/5 of the calibration "
                               "feeds, checks on the rest, falls back automatically",
                   config={"cli": "quantize MODEL -o OUT --calibration C --json --force --no-latency"}))
