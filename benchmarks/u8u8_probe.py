"""One 3x3 Conv (128 channels, 8x80 input) as a fused int8 kernel with u8, s8 and 7-bit s8 weights,
and in fp32, timed interleaved in one process: what onnxruntime's u8 x u8 kernels
(``--weight-range exact``) cost against u8 x s8 on this CPU, and whether u8 x s8 saturates here
(the largest output difference between u8 and s8 weights holding the same integers).

    python benchmarks/u8u8_probe.py [--rounds 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
from onnx import numpy_helper as nh

C, K, H, W = 128, 3, 8, 80


def session(kind: str, w: np.ndarray, threads: int) -> ort.InferenceSession:
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, C, H, W])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, C, H, W])
    if kind == "fp32":
        nodes = [oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
        inits = [nh.from_array((w * 0.01).astype(np.float32), "w")]
    else:
        q = {"u8": (w + 128).astype(np.uint8), "s8": w.astype(np.int8), "s7": (w // 2).astype(np.int8)}[kind]
        zp = np.full(C, 128, np.uint8) if kind == "u8" else np.zeros(C, np.int8)
        inits = [nh.from_array(q, "wq"), nh.from_array(np.full(C, 0.01, np.float32), "ws"), nh.from_array(zp, "wz"),
                 nh.from_array(np.array(0.02, np.float32), "xs"), nh.from_array(np.array(0, np.uint8), "xz"),
                 nh.from_array(np.array(0.05, np.float32), "ys"), nh.from_array(np.array(128, np.uint8), "yz")]
        nodes = [oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 oh.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
                 oh.make_node("Conv", ["xd", "wd"], ["y0"], pads=[1, 1, 1, 1]),
                 oh.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]),
                 oh.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    model = oh.make_model(oh.make_graph(nodes, kind, [x], [y], inits), opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (C, C, K, K))
    x = {"x": (rng.random((1, C, H, W), dtype=np.float32) * 5)}
    sessions = {k: session(k, w, args.threads) for k in ("fp32", "u8", "s8", "s7")}
    diff = np.abs(sessions["u8"].run(None, x)[0] - sessions["s8"].run(None, x)[0]).max()
    print(f"u8 vs s8 weights, same integers: largest output difference {diff:.3g} (0: s8 does not saturate here)")
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, x)
            times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    for k, m in med.items():
        print(f"{k:5s} median {m:7.3f} ms   x s8 {m / med['s8']:.2f}")


if __name__ == "__main__":
    main()
