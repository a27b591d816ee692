"""onnxruntime.quantization baselines, registered as candidates.

Every baseline first runs ``onnxruntime.quantization.shape_inference.quant_pre_process`` with its
defaults (symbolic shape inference, onnxruntime basic graph optimization, ONNX shape inference): the
onnxruntime quantization guide recommends this pre-processing step before quantizing.  If it fails
it is retried with ``skip_symbolic_shape=True`` (the PP-OCR models need that), and if that fails too
the original model is quantized; the notes say which happened.  Its time is part of the baseline's
wall time (``pre_s`` in the notes).

Static baselines (``quantize_static``): models below opset 13 are first converted to opset 13 with
``onnx.version_converter`` (per-channel QDQ needs it; see :func:`_upgrade_for_per_channel`); QDQ format, ``per_channel=True``, QInt8 weights, activations
QUInt8 (``_u8``) or QInt8 (``_s8``), calibration ``CalibrationMethod.MinMax`` or
``CalibrationMethod.Percentile`` (onnxruntime's default percentile, 99.999, and bin count), all other
options at their defaults.  The calibration data is the suite's calibration set, fed one sample at a
time through ``onnxcomp.data.Dataset``.

Dynamic baseline (``quantize_dynamic``): QInt8 weights, other options at their defaults (per-tensor
weights, all supported op types); it is attempted on every model, a failure is a row.

NNCF baseline (``nncf_default``): ``nncf.quantize(onnx_model, nncf.Dataset(feeds))`` with every
option at its default, on the same calibration feeds (each sample of the calibration ``.npz`` as a
batch-1 feed, as ``onnxcomp.data.Dataset`` reads it).  NNCF lives in its own virtual environment
(it pins its own dependencies): the build runs ``python -m benchmarks.baselines nncf ...`` with that
environment's interpreter, ``$NNCF_PYTHON`` or ``/work/venvs/nncf/bin/python``.  Create it with the
same onnx / onnxruntime / numpy versions as the main one::

    python -m venv /work/venvs/nncf
    /work/venvs/nncf/bin/pip install nncf==3.4.0 onnx==<same> onnxruntime==<same> numpy==<same>

Without it the row is ``skipped`` with the reason (the runner treats an ``Unavailable`` build
error as a skip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onnxruntime.quantization import CalibrationDataReader

from benchmarks.candidates import Candidate, register


class DatasetReader(CalibrationDataReader):
    """An onnxruntime ``CalibrationDataReader`` over an ``onnxcomp.data.Dataset`` (batch-1 feeds)."""

    def __init__(self, calib_source: Path, model_path: Path) -> None:
        from onnxcomp import io
        from onnxcomp.data import Dataset

        self.dataset = Dataset(calib_source, io.load_model(model_path, check=False))
        self.count = 0
        self._it = iter(self.dataset)

    def get_next(self):
        feed = next(self._it, None)
        if feed is not None:
            self.count += 1
        return feed

    def rewind(self) -> None:
        self._it = iter(self.dataset)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _preprocess(model_path: Path, work: Path, notes: dict) -> Path:
    """``quant_pre_process`` with its defaults; if that fails, again without symbolic shape inference.

    The second attempt is the documented switch (``skip_symbolic_shape``) for models the symbolic
    shape inference cannot handle (all three PP-OCR models); it still runs onnxruntime's graph
    optimization, which turns weights held in Constant nodes into initializers the quantizer can
    quantize.  If both fail, the original model is quantized.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "pre.onnx"
    t0 = time.perf_counter()
    errors = []
    try:
        for label, kwargs in (("defaults", {}), ("skip_symbolic_shape=True", {"skip_symbolic_shape": True})):
            try:
                quant_pre_process(str(model_path), str(out), **kwargs)
            except Exception as exc:
                errors.append(f"{label}: {_first_line(exc)}")
                continue
            notes["pre_process"] = f"quant_pre_process({label})" + (
                f" after failure with {'; '.join(errors)}" if errors else ""
            )
            return out
        notes["pre_process"] = f"quant_pre_process failed ({'; '.join(errors)}); original model quantized"
        return model_path
    finally:
        notes["pre_s"] = round(time.perf_counter() - t0, 3)


def _upgrade_for_per_channel(src: Path, work: Path, notes: dict) -> Path:
    """Convert a model below opset 13 to opset 13 (``onnx.version_converter``).

    Per-channel QDQ needs ``DequantizeLinear``'s ``axis`` attribute, which exists from opset 13.
    onnxruntime's quantizer does not upgrade the opset itself: on the opset-12 PP-OCR rec model it
    writes ``axis`` into opset-12 DequantizeLinear nodes and onnxruntime then refuses the model
    ("Unrecognized attribute: axis for operator DequantizeLinear").
    """
    import onnx

    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 13:
        return src
    out = work / "pre13.onnx"
    onnx.save(onnx.version_converter.convert_version(model, 13), str(out))
    notes["opset"] = f"opset {opset} -> 13 (onnx.version_converter) for per-channel QDQ"
    return out


def _static(activation: str, method: str):
    def build(model_path: Path, calib_source: Path, out_path: Path) -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        notes: dict = {}
        work = Path(tempfile.mkdtemp(prefix=".ortq-", dir=out_path.parent))
        try:
            src = _upgrade_for_per_channel(_preprocess(model_path, work, notes), work, notes)
            reader = DatasetReader(calib_source, model_path)
            t0 = time.perf_counter()
            quantize_static(
                str(src),
                str(out_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
            )
            notes["quantize_s"] = round(time.perf_counter() - t0, 3)
            notes["calib_samples"] = reader.count
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return notes

    return build


def _dynamic(model_path: Path, calib_source: Path, out_path: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    notes: dict = {}
    work = Path(tempfile.mkdtemp(prefix=".ortq-", dir=out_path.parent))
    try:
        src = _preprocess(model_path, work, notes)
        t0 = time.perf_counter()
        quantize_dynamic(str(src), str(out_path), weight_type=QuantType.QInt8)
        notes["quantize_s"] = round(time.perf_counter() - t0, 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return notes


for _method, _tag in (("MinMax", "minmax"), ("Percentile", "pct")):
    for _act in ("u8", "s8"):
        register(
            Candidate(
                f"ort_static_{_tag}_{_act}",
                _static(_act, _method),
                kind="ort-static",
                config={"format": "QDQ", "per_channel": True, "activation": _act, "weights": "s8",
                        "calibration": _method, "preprocess": True},
                description=(
                    f"quantize_static QDQ per-channel, act {'QUInt8' if _act == 'u8' else 'QInt8'}, "
                    f"weights QInt8, {_method} calibration"
                ),
            )
        )
register(Candidate("ort_dynamic_s8", _dynamic, kind="ort-dynamic", description="quantize_dynamic, weights QInt8",
                   config={"weights": "s8", "preprocess": True}))


# --------------------------------------------------------------------------- NNCF

NNCF_VERSION = "3.4.0"
NNCF_PYTHON_DEFAULT = "/work/venvs/nncf/bin/python"


class Unavailable(RuntimeError):
    """A baseline's tool is not installed: the runner makes its row ``skipped``, not an error."""


def nncf_python() -> str:
    return os.environ.get("NNCF_PYTHON", NNCF_PYTHON_DEFAULT)


def _nncf(model_path: Path, calib_source: Path, out_path: Path) -> dict:
    python = nncf_python()
    if not Path(python).is_file():
        raise Unavailable(f"nncf is not installed: no interpreter at {python} (set NNCF_PYTHON; see "
                          "benchmarks/baselines.py for the venv)")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([python, "-m", "benchmarks.baselines", "nncf", str(model_path), str(calib_source),
                           str(out_path)], env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode == 3:
        raise Unavailable(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "nncf cannot be imported")
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"nncf.quantize failed (exit {proc.returncode}): {tail}")
    notes = {}
    for line in proc.stdout.splitlines():
        if line.startswith("NOTE "):
            key, _, value = line[5:].partition("=")
            notes[key] = value
    return notes


def _nncf_child(model_path: str, calib_source: str, out_path: str) -> int:
    """In NNCF's environment: quantize with its defaults and save; exit 3 when nncf is missing."""
    try:
        import nncf
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"nncf cannot be imported in {sys.executable}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    import numpy as np
    import onnx

    model = onnx.load(model_path)
    with np.load(calib_source, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    n = next(iter(arrays.values())).shape[0]
    feeds = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)]
    t0 = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(feeds))
    print(f"NOTE quantize_s={time.perf_counter() - t0:.3f}")
    print(f"NOTE nncf={nncf.__version__}")
    print(f"NOTE calib_samples={n}")
    tmp = out_path + ".partial"
    onnx.save(quantized, tmp)
    os.replace(tmp, out_path)
    return 0


register(Candidate("nncf_default", _nncf, kind="nncf",
                   description=f"NNCF {NNCF_VERSION} nncf.quantize on the ONNX model, every option at its default "
                               "(own venv, subprocess)",
                   config={"tool": "nncf", "version": NNCF_VERSION, "options": "defaults"}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "nncf":
        sys.exit(_nncf_child(*sys.argv[2:]))
    sys.exit("usage: python -m benchmarks.baselines nncf MODEL.onnx CALIB.npz OUT.onnx")
