"""Sixth-session review of the size route's compact storage and of the check's kinds read from
returned shapes: each test here failed before its fix."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.cluster.passes import ClusterConfig, ClusterPass
from onnxcomp.runtime import run_model
from onnxcomp.testing import assert_equivalent


def _gemms(rng, biases):
    """x[N, 32] -> Gemm -> Relu -> ... one Gemm per bias, each bias ``biases[i]`` (16 values)."""
    nodes, inits, x = [], [], "x"
    for i, b in enumerate(biases):
        nodes += [oh.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], transB=1)]
        inits += [(f"w{i}", (0.3 * rng.standard_normal((16 if i else 16, 32 if i == 0 else 16))).astype(np.float32)),
                  (f"b{i}", np.asarray(b, np.float32))]
        x = f"g{i}"
    return make_proto(nodes, [("x", ["N", 32])], [(x, ["N", 16])], inits, opset=18)


def test_float16_biases_keep_float32_where_float16_cannot_hold_the_tensor(rng):
    """float16 keeps every value of a stored bias within 2^-11 of the tensor's peak: a bias whose
    values all lie below float16's normal range (1e-8: flushed to zero before the fix) or beyond it
    (1e5) stays float32, exactly; an ordinary bias (one tiny value among normal ones) goes float16."""
    tiny = 1e-8 * (1 + rng.random(16))
    huge = 1e5 * (1 + rng.random(16))
    normal = rng.standard_normal(16)
    normal[3] = 1e-8
    model = io.load_model(_gemms(rng, [tiny, huge, normal]))
    original = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    stats = ClusterPass(ClusterConfig(format="sparse", bits=4, min_elements=10_000,
                                      float16_biases=True))(model).stats
    stored = set(stats.get("int8_biases", {}))
    assert stored == {"b2"}, stored
    for name in ("b0", "b1"):  # kept as they were
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), original[name])
    for record in stats["int8_biases"].values():
        assert record["relative_error"] < 2.0**-20
    # the same model with b2 rounded to float16 by hand computes what the stored one computes
    reference = io.load_model(_gemms(np.random.default_rng(0), [tiny, huge, normal]))
    for name, array in original.items():
        reference.graph.initializers[name].const_value = ir.tensor(array, name=name)
    b2 = original["b2"].astype(np.float16).astype(np.float32)
    reference.graph.initializers["b2"].const_value = ir.tensor(b2, name="b2")
    feeds = [{"x": (1e-3 * rng.standard_normal((4, 32))).astype(np.float32)} for _ in range(2)]
    assert_equivalent(reference, model, feeds, atol=0, rtol=1e-6)
