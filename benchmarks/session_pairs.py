"""Does a short run's latency depend on the session? A/A and int8/fp32 ratios, repeated with fresh
sessions, on a P-Net-like fully convolutional model (MTCNN's first stage) built here, seeded.

    python -m benchmarks.session_pairs [--size 12] [--repeats 6] [--threads 1,2]

The model: Conv 3x3 (3 -> 10) + PRelu, MaxPool 2x2, Conv 3x3 (10 -> 16) + PRelu, Conv 3x3
(16 -> 32) + PRelu, two 1x1 heads (2 classes + Softmax, 4 box offsets); input [1, 3, H, W] with H
and W free. 60 uniform random samples of SIZE x SIZE (seed 0) are its calibration data;
onnxcomp's default static int8 model is built from them (the API's quantize). The timed feeds are
the held-out ones a quantize run checks on (every 5th sample, the first 8).

Per thread count and repeat, with quantize's latency settings (30 rounds, 3 warm-up runs):
an A/A measurement (the fp32 model in two sessions), an int8/fp32 measurement on one pair of
sessions (what bench and quantize did), and ``int8_latency_report``'s (pooled over session pairs
where the float run is short at several threads). Each row: the ratio, its 95% interval, the
medians in ms. Nothing is written.
"""

from __future__ import annotations

import argparse

import numpy as np


def pnet(size: int):
    import onnx.helper as oh
    import onnx.numpy_helper as onh

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(x, cin, cout, k, name):
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([onh.from_array(w, name + ".w"), onh.from_array(b, name + ".b")])
        nodes.append(oh.make_node("Conv", [x, name + ".w", name + ".b"], [name], name=name, kernel_shape=[k, k]))
        return name

    def prelu(x, c, name):
        inits.append(onh.from_array(np.full((c, 1, 1), 0.25, np.float32), name + ".s"))
        nodes.append(oh.make_node("PRelu", [x, name + ".s"], [name], name=name))
        return name

    x = prelu(conv("input", 3, 10, 3, "conv1"), 10, "prelu1")
    nodes.append(oh.make_node("MaxPool", [x], ["pool1"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                              name="pool1"))
    x = prelu(conv(prelu(conv("pool1", 10, 16, 3, "conv2"), 16, "prelu2"), 16, 32, 3, "conv3"), 32, "prelu3")
    nodes.append(oh.make_node("Softmax", [conv(x, 32, 2, 1, "conv4_1")], ["prob"], axis=1, name="softmax"))
    nodes.append(oh.make_node("Identity", [conv(x, 32, 4, 1, "conv4_2")], ["reg"], name="id"))
    graph = oh.make_graph(nodes, "pnet", [oh.make_tensor_value_info("input", 1, [1, 3, "H", "W"])],
                          [oh.make_tensor_value_info("prob", 1, [1, 2, "h", "w"]),
                           oh.make_tensor_value_info("reg", 1, [1, 4, "h", "w"])], inits)
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, rng.random((60, 3, size, size), dtype=np.float32) * 2 - 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.session_pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=12, help="input height and width (default 12, P-Net's crops)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", default="1,2")
    args = p.parse_args(argv)
    from onnxcomp.io import load_model
    from onnxcomp.measure.bench import bench_models, int8_latency_report
    from onnxcomp.quant.api import quantize

    proto, x = pnet(args.size)
    fp32 = load_model(proto.SerializeToString())
    int8, _ = quantize(fp32, [{"input": x[i : i + 1]} for i in range(60) if i % 5 != 4])
    feeds = [{"input": x[i : i + 1]} for i in range(4, 60, 5)][:8]
    settings = {"runs": 30, "time_budget": 10.0, "warmup_runs": 3, "warmup_seconds": 0.2}
    print("| threads | repeat | measurement | ratio [95%] | medians ms |\n|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        for k in range(args.repeats):
            for what, pair in (("A/A fp32", (fp32, fp32)), ("int8/fp32, one pair", (fp32, int8))):
                rows = bench_models([("a", pair[0]), ("b", pair[1])], feeds, threads=threads, seed=k, **settings)
                lo, hi = rows[1]["ratio_ci95"]
                print(f"| {threads} | {k} | {what} | {rows[1]['ratio_to_first']:.3f} [{lo:.3f}, {hi:.3f}] | "
                      f"{rows[0]['median_ms']:.3f} / {rows[1]['median_ms']:.3f} |", flush=True)
            r = int8_latency_report(fp32, int8, feeds, threads=threads, runs=30, time_budget=10.0)
            pairs = ", ".join(f"{v:.2f}" for v in r.get("session_ratios", []))
            print(f"| {threads} | {k} | int8_latency_report{f' (pairs {pairs})' if pairs else ''} | {r['ratio']:.3f} "
                  f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}] | {r['float_median_ms']:.3f} / "
                  f"{r['int8_median_ms']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
