"""Static int8 keeps a YOLO-style box decoding in float: no int8 Concat between float producers.

A YOLOv8 export ends in element-wise box arithmetic after its last convolution: anchor points
minus / plus the predicted distances, centre ``(x1 + x2) / 2`` and size ``x2 - x1`` joined by a
Concat, times the stride of each anchor (8, 16 or 32), then joined with the class scores. When
that Concat ran in int8 (a Concat used to go int8 whatever its neighbours), the coordinates were
put on one 8-bit grid over the whole image (0..1024 pixels: 4-pixel steps, and coarser in grid
units before the stride multiply), and the stride constant itself on a uint8 grid (8.03, 15.94,
32): the layout YOLO of the benchmark suite lost 21 F1 points on 6 tune pages (78.5 against
fp32), 95.5 with the decoding in float.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
from conftest import make_proto

from onnxcomp import io
from onnxcomp.quant.api import quantize
from onnxcomp.testing import run_model

H = W = 16  # one feature level of 16 x 16 anchors
A = H * W
C = 3  # classes


def _detector_proto(rng):
    """Conv backbone, a box branch (4 distances per anchor, >= 0) and a class branch (Sigmoid),
    YOLOv8's decoding, output ``[1, 4 + C, A]`` in pixels."""
    ch = 16
    # anchors of three levels (strides 8, 16, 32) spread over a 1024-pixel image, in grid units
    # (up to 128 at stride 8), as YOLOv8 at 1024 x 1024: the 16 x 16 map stands for all three
    strides = np.array([8.0, 16.0, 32.0], np.float32)[np.arange(A) % 3]
    ys, xs = np.mgrid[0:H, 0:W]
    pixels = (np.stack([xs.ravel(), ys.ravel()]) + 0.5) * (1024 / H)
    anchors = (pixels / strides)[None].astype(np.float32)  # [1, 2, A]
    strides = strides[None, None]  # [1, 1, A]
    inits = [
        ("w0", rng.standard_normal((ch, 3, 3, 3)).astype(np.float32) * 0.4),
        ("b0", rng.standard_normal(ch).astype(np.float32) * 0.1),
        ("w1", rng.standard_normal((ch, ch, 3, 3)).astype(np.float32) * 0.15),
        ("b1", rng.standard_normal(ch).astype(np.float32) * 0.1),
        ("wbox", rng.standard_normal((4, ch, 1, 1)).astype(np.float32) * 0.3),
        ("bbox", np.full(4, 1.0, np.float32)),
        ("wcls", rng.standard_normal((C, ch, 1, 1)).astype(np.float32) * 0.3),
        ("bcls", rng.standard_normal(C).astype(np.float32) * 0.1),
        ("shape_box", np.array([1, 4, A], np.int64)),
        ("shape_cls", np.array([1, C, A], np.int64)),
        ("anchors", anchors),
        ("strides", strides),
        ("two", np.array(2.0, np.float32)),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        oh.make_node("Sigmoid", ["c0"], ["s0"], name="sig0"),
        oh.make_node("Mul", ["c0", "s0"], ["a0"], name="silu0"),
        oh.make_node("Conv", ["a0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        # box branch: distances left/top/right/bottom in grid units, >= 0
        oh.make_node("Conv", ["a1", "wbox", "bbox"], ["dist_raw"], name="box_conv"),
        oh.make_node("Relu", ["dist_raw"], ["dist_map"], name="box_relu"),
        oh.make_node("Reshape", ["dist_map", "shape_box"], ["dist"], name="box_reshape"),
        oh.make_node("Split", ["dist"], ["lt", "rb"], axis=1, num_outputs=2, name="split"),
        oh.make_node("Sub", ["anchors", "lt"], ["x1y1"], name="sub"),
        oh.make_node("Add", ["anchors", "rb"], ["x2y2"], name="add"),
        oh.make_node("Add", ["x1y1", "x2y2"], ["sum"], name="add_centre"),
        oh.make_node("Div", ["sum", "two"], ["cxy"], name="div"),
        oh.make_node("Sub", ["x2y2", "x1y1"], ["wh"], name="sub_size"),
        oh.make_node("Concat", ["cxy", "wh"], ["box_grid"], axis=1, name="concat_box"),
        oh.make_node("Mul", ["box_grid", "strides"], ["box_px"], name="mul_stride"),
        # class branch
        oh.make_node("Conv", ["a1", "wcls", "bcls"], ["cls_raw"], name="cls_conv"),
        oh.make_node("Reshape", ["cls_raw", "shape_cls"], ["cls"], name="cls_reshape"),
        oh.make_node("Sigmoid", ["cls"], ["scores"], name="cls_sigmoid"),
        oh.make_node("Concat", ["box_px", "scores"], ["y"], axis=1, name="concat_out"),
    ]
    return make_proto(nodes, [("x", [1, 3, H, W])], [("y", [1, 4 + C, A])], inits, opset=18)


def _feeds(rng, n):
    return [{"x": rng.random((1, 3, H, W), dtype=np.float32)} for _ in range(n)]


def test_box_decoding_stays_float_and_boxes_keep_their_pixels(rng):
    proto = _detector_proto(rng)
    reference = io.load_model(proto)
    calib, held_out = _feeds(rng, 16), _feeds(rng, 8)
    quantized, report = quantize(proto, calib)
    # the backbone and the head convolutions run in int8; the decoding between float ops does not
    assert report["onnxruntime"]["int8_by_op"].get("QLinearConv", 0) == 4, report["onnxruntime"]
    ref = np.concatenate([o[0] for o in run_model(reference, held_out)])
    out = np.concatenate([o[0] for o in run_model(quantized, held_out)])
    box_err = np.abs(out[:, :4] - ref[:, :4])
    # only the convolutions' noise reaches the boxes (0..996 px; measured 3.9 px at most, 0.42 px
    # mean); with the Concat in int8 the centres sat on a 0.5-grid-unit grid (16 px at stride 32),
    # the pixels on a 3.9-pixel grid, the strides on a uint8 one (measured: 11.7 px, 2.7 px mean)
    assert box_err.max() < 6.0, box_err.max()
    assert box_err.mean() < 1.0, box_err.mean()
    for name in ("concat_box", "mul_stride"):
        assert "more Q/DQ conversions" in report["skipped"].get(name, ""), (name, report["skipped"])
    scores_err = np.abs(out[:, 4:] - ref[:, 4:]).max()
    assert scores_err < 0.05, scores_err


def test_concat_between_int8_convolutions_stays_int8(rng):
    """A C2f-style block (Split of a convolution, a convolution on one half, Concat, convolution):
    the Concat joins int8 tensors for an int8 reader, so it runs as QLinearConcat."""
    ch = 8
    proto = make_proto(
        [
            oh.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
            oh.make_node("Relu", ["c0"], ["r0"], name="relu0"),
            oh.make_node("Split", ["r0"], ["h0", "h1"], axis=1, num_outputs=2, name="split"),
            oh.make_node("Conv", ["h1", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            oh.make_node("Concat", ["h0", "h1", "r1"], ["cat"], axis=1, name="concat"),
            oh.make_node("Conv", ["cat", "w2"], ["y"], name="conv2"),
        ],
        [("x", [1, 3, 8, 8])],
        [("y", [1, 4, 8, 8])],
        [("w0", rng.standard_normal((ch, 3, 3, 3)).astype(np.float32) * 0.4),
         ("w1", rng.standard_normal((ch // 2, ch // 2, 3, 3)).astype(np.float32) * 0.3),
         ("w2", rng.standard_normal((4, ch + ch // 2, 1, 1)).astype(np.float32) * 0.3)],
        opset=18,
    )
    reference = io.load_model(proto)
    feeds = [{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(16)]
    quantized, report = quantize(proto, feeds)
    assert "concat" not in report["skipped"]
    assert report["onnxruntime"]["int8_by_op"].get("QLinearConcat", 0) == 1, report["onnxruntime"]
    ref = np.concatenate([o[0] for o in run_model(reference, feeds[:8])])
    out = np.concatenate([o[0] for o in run_model(quantized, feeds[:8])])
    sqnr = 10 * np.log10(np.square(ref).sum() / np.square(out - ref).sum())
    assert sqnr > 25, sqnr
