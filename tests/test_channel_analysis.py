"""Channel dependency analysis (onnxcomp.analysis.channels): groups, offsets, blocks, freezing.

Besides structural assertions, :func:`check_numerically` proves a group's mapping with
onnxruntime: zero channel c at its source (producer weights and biases, BN gamma/beta, additive
per-channel constants), then randomize the consumers' input slices for c: the outputs must not
move (so the slices are exactly the ones reading channel c: offsets, Concat segments, Flatten
blocks), while randomizing the slices of all the *other* channels must move them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import MODELS, make_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcomp import io
from onnxcomp.analysis.channels import (
    ChannelGroup,
    Consumer,
    Producer,
    ShapeEdit,
    analyze_channels,
)
from onnxcomp.ops import CHANNEL_RULES

# ------------------------------------------------------------------------------------------
# Model building and the numeric check
# ------------------------------------------------------------------------------------------


class Builder:
    """Small seeded graph builder on top of onnx.helper."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[tuple[str, np.ndarray]] = []

    def const(self, name: str, array) -> str:
        self.inits.append((name, np.asarray(array)))
        return name

    def weight(self, name: str, shape, scale: float = 0.5) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op: str, inputs, name: str, outputs: int = 1, **attrs):
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(oh.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 3, group: int = 1, bias: bool = True):
        ins = [x, self.weight(f"{name}.w", (cout, cin // group, k, k))]
        if bias:
            ins.append(self.weight(f"{name}.b", (cout,)))
        return self.op("Conv", ins, name, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int, name: str) -> str:
        r = self.rng
        ins = [
            x,
            self.const(f"{name}.gamma", r.uniform(0.5, 1.5, c).astype(np.float32)),
            self.const(f"{name}.beta", r.standard_normal(c).astype(np.float32)),
            self.const(f"{name}.mean", r.standard_normal(c).astype(np.float32) * 0.1),
            self.const(f"{name}.var", r.uniform(0.5, 1.5, c).astype(np.float32)),
        ]
        return self.op("BatchNormalization", ins, name)

    def model(self, inputs, outputs, opset: int = 17) -> ir.Model:
        # outputs are declared without shapes (check=False); onnxruntime validates the graphs
        return io.load_model(make_proto(self.nodes, inputs, outputs, self.inits, opset=opset), check=False)


_ZERO_PARAMS = {("BatchNormalization", 1), ("BatchNormalization", 2), ("InstanceNormalization", 1),
                ("InstanceNormalization", 2)}
_ZERO_OPS = {"Add", "Sub", "Concat"}


def _assign(arrays, value: ir.Value, axis: int, idx: np.ndarray, fill) -> None:
    arr = arrays[value.name]
    index = [slice(None)] * arr.ndim
    index[axis] = idx
    shape = list(arr.shape)
    shape[axis] = len(idx)
    arr[tuple(index)] = fill(shape)


def _session(proto: onnx.ModelProto, arrays, extra_outputs=()):
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for init in proto.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(onh.from_array(arrays[init.name], init.name))
    for name in extra_outputs:
        proto.graph.output.append(oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(model: ir.Model, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        shape = [d if isinstance(d, int) else 2 for d in v.shape.dims]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def check_numerically(model: ir.Model, group: ChannelGroup, *, seed: int = 0, activations: bool = True) -> None:
    """Zeroing channel c at the source makes the consumers' slices for c irrelevant (and only those)."""
    rng = np.random.default_rng(seed)
    proto = ir.to_proto(model)
    base = {v.name: np.array(v.const_value.numpy()) for v in model.graph.initializers.values()}
    c = int(rng.integers(group.size))
    zeroed = {k: v.copy() for k, v in base.items()}

    def zeros(shape):
        return np.zeros(shape, np.float32)

    def noise(shape):
        return rng.standard_normal(shape).astype(np.float32) * 3

    for p in group.producers:
        _assign(zeroed, p.value, p.axis, p.indices([c]), zeros)
        if p.bias is not None:
            _assign(zeroed, p.bias, p.bias_axis, p.bias_indices([c]), zeros)
    for m in group.params:
        if (m.node.op_type, m.input_index) in _ZERO_PARAMS or m.node.op_type in _ZERO_OPS:
            _assign(zeroed, m.value, m.axis, m.indices([c]), zeros)
    feeds = _feeds(model, rng)
    outputs = {o.name for o in model.graph.outputs}
    inputs_of_consumers = {m.node.inputs[0].name for m in group.consumers}
    watched = [a for a in group.activations if not a.value.is_graph_input() and a.value.name not in outputs]
    if not activations:
        watched = [a for a in watched if a.value.name in inputs_of_consumers]
    act_names = list(dict.fromkeys(a.value.name for a in watched))
    results = _session(proto, zeroed, act_names).run(None, feeds)
    n_out = len(model.graph.outputs)
    reference = results[:n_out]
    values = dict(zip(act_names, results[n_out:]))
    if activations:
        for a in watched:
            got = np.take(values[a.value.name], a.indices([c]), axis=a.axis)
            assert np.abs(got).max() == 0, f"activation {a.value.name} not zero for channel {c}"

    consumers = [m for m in group.consumers]
    assert consumers or not group.size, "a group without consumers has nothing to check"
    poked = {k: v.copy() for k, v in zeroed.items()}
    for m in consumers:
        _assign(poked, m.value, m.axis, m.indices([c]), noise)
    after = _session(proto, poked).run(None, feeds)
    for ref, got in zip(reference, after):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    others = [i for i in range(group.size) if i != c]
    # control (only if the other channels are alive at the consumers' inputs): randomizing the
    # other channels' slices must move the outputs, so the check above is not vacuous
    alive = bool(others) and any(
        np.abs(np.take(values[a.value.name], a.indices(others), axis=a.axis)).max() > 1e-3
        for a in watched
        if a.value.name in inputs_of_consumers and a.value.name in values
    )
    if others and alive:
        control = {k: v.copy() for k, v in zeroed.items()}
        for m in consumers:
            _assign(control, m.value, m.axis, m.indices(others), noise)
        moved = _session(proto, control).run(None, feeds)
        assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(reference, moved)), (
            "control: randomizing the other channels' slices should change the output"
        )


def only(groups, pred):
    found = [g for g in groups if pred(g)]
    assert len(found) == 1, [g.describe() for g in found]
    return found[0]


def producing(analysis, node_name: str) -> ChannelGroup:
    return only(analysis.groups, lambda g: any(p.node.name == node_name for p in g.producers))


def producer_nodes(g: ChannelGroup) -> set[str]:
    return {p.node.name for p in g.producers}


def consumer_slices(g: ChannelGroup) -> set[tuple[str, int, int, int]]:
    return {(m.node.name, m.axis, m.offset, m.block) for m in g.consumers}


# ------------------------------------------------------------------------------------------
# Small models
# ------------------------------------------------------------------------------------------


def test_conv_bn_relu_conv():
    b = Builder(1)
    y = b.conv("x", 3, 6, "c1")
    y = b.bn(y, 6, "bn")
    y = b.op("Relu", [y], "relu")
    b.conv(y, 6, 4, "c2")
    model = b.model([("x", [1, 3, 5, 5])], [("c2", None)])
    a = analyze_channels(model)
    g = producing(a, "c1")
    assert g.prunable and g.size == 6
    assert consumer_slices(g) == {("c2", 1, 0, 1)}
    assert sorted((p.node.name, p.input_index) for p in g.params) == [("bn", i) for i in (1, 2, 3, 4)]
    (p,) = g.producers
    assert (p.value.name, p.axis, p.bias.name, p.bias_axis) == ("c1.w", 0, "c1.b", 0)
    assert {m.value.name for m in g.activations} == {"c1", "bn", "relu"}
    cuts = {(t.value.name, t.axis) for t in g.tensor_cuts()}
    assert cuts == {("c1.w", 0), ("c1.b", 0), ("bn.gamma", 0), ("bn.beta", 0), ("bn.mean", 0),
                    ("bn.var", 0), ("c2.w", 1)}
    assert g.params_per_channel == 27 + 1 + 4 + 4 * 9
    assert g.macs_per_channel == 25 * 27 + 25 * 4 * 9
    # input channels (graph input) and the output group (graph output) are frozen
    assert len(a.groups) == 3 and len(a.prunable) == 1
    assert "graph input 'x'" in only(a.groups, lambda g: g.size == 3).reasons
    assert "graph output 'c2'" in producing(a, "c2").reasons
    check_numerically(model, g)


def _residual(seed=2):
    b = Builder(seed)
    x0 = b.op("Relu", [b.bn(b.conv("x", 3, 8, "c0"), 8, "bn0")], "r0")
    y = b.op("Relu", [b.bn(b.conv(x0, 8, 5, "c1"), 5, "bn1")], "r1")
    y = b.bn(b.conv(y, 5, 8, "c2"), 8, "bn2")
    s = b.op("Add", [y, x0], "add")
    s = b.op("Relu", [s], "r2")
    b.conv(s, 8, 4, "c3")
    return b.model([("x", [1, 3, 6, 6])], [("c3", None)])


def test_residual_add_couples_both_branches():
    model = _residual()
    a = analyze_channels(model)
    g = producing(a, "c0")
    assert producer_nodes(g) == {"c0", "c2"} and g.num_producers == 2
    assert {m.value.name for m in g.activations} >= {"c0", "c2", "add", "r2", "r0", "bn2"}
    assert consumer_slices(g) == {("c1", 1, 0, 1), ("c3", 1, 0, 1)}
    assert g.prunable and g.size == 8
    inner = producing(a, "c1")
    assert inner.prunable and consumer_slices(inner) == {("c2", 1, 0, 1)}
    check_numerically(model, g)
    check_numerically(model, inner, seed=3)


def test_concat_branches_map_to_consumer_offsets():
    b = Builder(3)
    x = b.op("Relu", [b.conv("x", 3, 6, "stem")], "r0")
    y1 = b.op("Relu", [b.bn(b.conv(x, 6, 4, "b1", k=1), 4, "bn1")], "r1")
    y2 = b.op("Relu", [b.conv(x, 6, 5, "b2")], "r2")
    cat = b.op("Concat", [y1, y2], "cat", axis=1)
    b.conv(b.op("MaxPool", [cat], "pool", kernel_shape=[2, 2]), 9, 3, "head")
    model = b.model([("x", [1, 3, 6, 6])], [("head", None)])
    a = analyze_channels(model)
    g1, g2 = producing(a, "b1"), producing(a, "b2")
    assert (g1.size, g2.size) == (4, 5)
    assert consumer_slices(g1) == {("head", 1, 0, 1)}
    assert consumer_slices(g2) == {("head", 1, 4, 1)}
    assert {(m.value.name, m.offset) for m in g2.activations} >= {("cat", 4), ("pool", 4), ("r2", 0)}
    stem = producing(a, "stem")
    assert consumer_slices(stem) == {("b1", 1, 0, 1), ("b2", 1, 0, 1)}
    for i, g in enumerate((g1, g2, stem)):
        assert g.prunable
        check_numerically(model, g, seed=i)


def test_concat_with_constant_and_graph_input_segments():
    b = Builder(4)
    y = b.op("Relu", [b.conv("x", 2, 3, "c")], "r")
    k = b.weight("k", (1, 2, 4, 4))
    cat = b.op("Concat", [y, k, "x"], "cat", axis=1)
    b.conv(cat, 7, 2, "head", k=1)
    model = b.model([("x", [1, 2, 4, 4])], [("head", None)])
    a = analyze_channels(model)
    g = producing(a, "c")
    assert g.prunable and consumer_slices(g) == {("head", 1, 0, 1)}
    const = only(a.groups, lambda g: any(p.value.name == "k" for p in g.params))
    assert const.prunable and const.size == 2 and consumer_slices(const) == {("head", 1, 3, 1)}
    xg = only(a.groups, lambda g: any(m.value.name == "x" for m in g.activations))
    assert xg.frozen and ("head", 1, 5, 1) in consumer_slices(xg)
    check_numerically(model, g)
    check_numerically(model, const)


def test_depthwise_couples_input_and_output():
    b = Builder(5)
    y = b.op("Relu", [b.bn(b.conv("x", 3, 6, "pw1", k=1), 6, "bn1")], "r1")
    y = b.op("Relu", [b.bn(b.conv(y, 6, 6, "dw", group=6), 6, "bn2")], "r2")
    b.conv(y, 6, 4, "pw2", k=1)
    model = b.model([("x", [1, 3, 5, 5])], [("pw2", None)])
    a = analyze_channels(model)
    g = producing(a, "pw1")
    assert producing(a, "dw") is g
    assert producer_nodes(g) == {"pw1", "dw"} and g.size == 6 and g.prunable
    dw = only(g.producers, lambda p: p.node.name == "dw")
    assert dw.depthwise and (dw.value.name, dw.axis, dw.block) == ("dw.w", 0, 1)
    assert consumer_slices(g) == {("pw2", 1, 0, 1)}  # the depthwise conv is not a consumer
    (edit,) = g.shape_edits
    assert (edit.node.name, edit.attribute, edit.kind) == ("dw", "group", "size")
    assert edit.new_value(6, [1, 4]) == 4
    check_numerically(model, g)


def test_depthwise_multiplier_is_a_block():
    b = Builder(6)
    y = b.op("Relu", [b.conv("x", 2, 3, "pw1", k=1)], "r1")
    y = b.op("Relu", [b.conv(y, 3, 6, "dw", group=3)], "r2")  # multiplier 2
    b.conv(y, 6, 2, "pw2", k=1)
    model = b.model([("x", [1, 2, 5, 5])], [("pw2", None)])
    a = analyze_channels(model)
    g = producing(a, "pw1")
    assert g.size == 3 and consumer_slices(g) == {("pw2", 1, 0, 2)}
    dw = only(g.producers, lambda p: p.node.name == "dw")
    assert dw.block == 2 and list(dw.indices([1])) == [2, 3]
    check_numerically(model, g)


def test_grouped_conv_cuts_in_lock_step():
    b = Builder(7)
    y = b.op("Relu", [b.conv("x", 2, 8, "c1", k=1)], "r1")
    y = b.op("Relu", [b.conv(y, 8, 6, "gc", group=2)], "r2")  # 4 in / 3 out per group
    b.conv(y, 6, 2, "c3", k=1)
    model = b.model([("x", [1, 2, 5, 5])], [("c3", None)])
    a = analyze_channels(model)
    gin = producing(a, "c1")
    assert gin.prunable and gin.size == 4  # channel i of each group is cut together
    assert {(p.node.name, p.offset) for p in gin.producers} == {("c1", 0), ("c1", 4)}
    assert consumer_slices(gin) == {("gc", 1, 0, 1)}
    gout = producing(a, "gc")
    assert gout.prunable and gout.size == 3
    assert {(p.offset, p.bias_offset) for p in gout.producers} == {(0, 0), (3, 3)}
    assert consumer_slices(gout) == {("c3", 1, 0, 1), ("c3", 1, 3, 1)}
    check_numerically(model, gin)
    check_numerically(model, gout)


@pytest.mark.parametrize("pool", [False, True])
def test_flatten_into_gemm_blocks(pool):
    b = Builder(8)
    y = b.op("Relu", [b.bn(b.conv("x", 2, 3, "c", k=3), 3, "bn")], "r")
    if pool:
        y = b.op("GlobalAveragePool", [y], "gap")
    f = b.op("Flatten", [y], "flat", axis=1)
    feats = 3 if pool else 3 * 4 * 5
    b.op("Gemm", [f, b.weight("fc.w", (7, feats)), b.weight("fc.b", (7,))], "fc", transB=1)
    model = b.model([("x", [2, 2, 4, 5])], [("fc", None)])
    a = analyze_channels(model)
    g = producing(a, "c")
    block = 1 if pool else 20
    assert g.prunable and consumer_slices(g) == {("fc", 1, 0, block)}
    assert list(g.consumers[0].indices([1])) == list(range(block, 2 * block))
    check_numerically(model, g)


def test_flatten_with_dynamic_spatial_size_freezes():
    b = Builder(9)
    y = b.op("Relu", [b.conv("x", 2, 3, "c")], "r")
    f = b.op("Flatten", [y], "flat")
    b.op("MatMul", [f, b.weight("w", (48, 2))], "mm")
    model = b.model([("x", [1, 2, "H", "W"])], [("mm", None)])
    g = producing(analyze_channels(model), "c")
    assert g.frozen and any("Flatten 'flat'" in r and "static size" in r for r in g.reasons)


@pytest.mark.parametrize("target", [[-1, 60], [0, -1], [1, 60]])
def test_reshape_into_matmul(target):
    b = Builder(10)
    y = b.op("Relu", [b.conv("x", 2, 3, "c")], "r")
    t = b.const("shape", np.array(target, np.int64))
    f = b.op("Reshape", [y, t], "rs")
    b.op("MatMul", [f, b.weight("w", (60, 4))], "mm")
    model = b.model([("x", [1, 2, 4, 5])], [("mm", None)])
    a = analyze_channels(model)
    g = producing(a, "c")
    assert g.prunable and consumer_slices(g) == {("mm", 0, 0, 20)}
    edits = [(e.node.name, e.input_index, e.position) for e in g.shape_edits]
    assert edits == ([("rs", 1, 1)] if target[1] == 60 else [])
    if edits:
        assert g.shape_edits[0].new_value(60, [0, 2]) == 20
    check_numerically(model, g)


def test_reshape_splitting_the_channel_axis_freezes():
    b = Builder(11)
    y = b.op("MatMul", ["x", b.weight("w", (8, 8))], "mm")
    t = b.const("shape", np.array([0, 0, 2, 4], np.int64))
    b.op("Reshape", [y, t], "heads")
    model = b.model([("x", [1, 5, 8])], [("heads", None)])
    g = producing(analyze_channels(model), "mm")
    assert g.frozen and any("Reshape 'heads' changes the channel axis" in r for r in g.reasons)


def _mlp_block(d=6, h=10, tail="ln"):
    b = Builder(12)
    x = b.op("MatMul", ["x", b.weight("emb.w", (4, d))], "emb")
    hid = b.op("MatMul", [x, b.weight("w1", (d, h))], "fc1")
    hid = b.op("Add", [b.weight("b1", (h,)), hid], "fc1_add")
    z = b.op("Div", [hid, b.const("sqrt2", np.array(1.4142135, np.float32))], "div")
    z = b.op("Erf", [z], "erf")
    z = b.op("Add", [z, b.const("one", np.array(1.0, np.float32))], "add1")
    z = b.op("Mul", [hid, z], "mul")
    z = b.op("Mul", [z, b.const("half", np.array(0.5, np.float32))], "mul_half")
    o = b.op("MatMul", [z, b.weight("w2", (h, d))], "fc2")
    o = b.op("Add", [o, b.weight("b2", (d,))], "fc2_add")
    r = b.op("Add", [x, o], "residual")
    out = "residual"
    if tail == "ln":
        out = b.op("LayerNormalization", [r, b.weight("g", (d,)), b.weight("beta", (d,))], "ln", axis=-1)
    return b.model([("x", [2, 3, 4])], [(out, None)])


@pytest.mark.parametrize("tail", ["ln", "output"])
def test_transformer_mlp_hidden_dim(tail):
    model = _mlp_block(tail=tail)
    a = analyze_channels(model)
    hidden = producing(a, "fc1")
    assert hidden.prunable and hidden.size == 10
    assert consumer_slices(hidden) == {("fc2", 0, 0, 1)}
    assert {(p.value.name, p.axis) for p in hidden.params} == {("b1", 0)}
    (p,) = hidden.producers
    assert (p.value.name, p.axis) == ("w1", 1)
    stream = producing(a, "emb")
    assert producer_nodes(stream) == {"emb", "fc2"}
    assert ("fc1", 0, 0, 1) in consumer_slices(stream)
    expected = "LayerNormalization 'ln' mixes values" if tail == "ln" else "graph output 'residual'"
    assert stream.frozen and any(expected in r for r in stream.reasons)
    check_numerically(model, hidden, activations=False)  # Erf(0) + 1 is not 0


def test_swish_and_per_channel_constants():
    b = Builder(13)
    y = b.conv("x", 2, 4, "c")
    s = b.op("Mul", [y, b.op("Sigmoid", [y], "sig")], "swish")
    s = b.op("Mul", [s, b.weight("scale", (1, 4, 1, 1))], "scale_mul")
    s = b.op("Add", [s, b.weight("shift", (4, 1, 1))], "shift_add")
    s = b.op("Div", [s, b.const("two", np.array([2.0], np.float32))], "div")
    b.conv(s, 4, 3, "c2")
    model = b.model([("x", [1, 2, 4, 4])], [("c2", None)])
    g = producing(analyze_channels(model), "c")
    assert g.prunable and consumer_slices(g) == {("c2", 1, 0, 1)}
    assert {(p.value.name, p.axis) for p in g.params} == {("scale", 1), ("shift", 0)}
    check_numerically(model, g, activations=False)  # sigmoid(0) = 0.5


def test_broadcast_against_graph_input_freezes_only_when_coupled():
    b = Builder(14)
    y = b.conv("x", 2, 4, "c")
    y = b.op("Mul", [y, "gate"], "gated")  # gate [1,1,4,4]: broadcast on channels
    y = b.op("Add", [y, "bias_in"], "biased")  # bias_in [1,4,1,1]: couples with an input
    b.conv(y, 4, 2, "c2")
    model = b.model([("x", [1, 2, 4, 4]), ("gate", [1, 1, 4, 4]), ("bias_in", [1, 4, 1, 1])], [("c2", None)])
    g = producing(analyze_channels(model), "c")
    assert g.frozen and g.reasons == ["graph input 'bias_in'"]


def test_split_and_slice_segments():
    b = Builder(15)
    y = b.op("Relu", [b.conv("x", 2, 8, "c")], "r")
    s0, s1 = b.op("Split", [y, b.const("sizes", np.array([3, 5], np.int64))], "split", outputs=2, axis=1)
    b.conv(b.op("Relu", [s0], "ra"), 3, 2, "ca", k=1)
    sl = b.op(
        "Slice",
        [s1, b.const("st", np.array([1], np.int64)), b.const("en", np.array([-1], np.int64)),
         b.const("ax", np.array([1], np.int64))],
        "slice",
    )
    b.conv(sl, 3, 2, "cb", k=1)
    model = b.model([("x", [1, 2, 4, 4])], [("ca", None), ("cb", None)])
    a = analyze_channels(model)
    groups = [g for g in a.groups if producer_nodes(g) == {"c"}]
    # conv channels: [0,3) -> ca, 3 dropped by the slice, [4,7) -> cb, 7 dropped
    layout = sorted((p.offset, g.size, tuple(sorted(consumer_slices(g)))) for g in groups for p in g.producers)
    assert layout == [(0, 3, (("ca", 1, 0, 1),)), (3, 1, ()), (4, 3, (("cb", 1, 0, 1),)), (7, 1, ())]
    assert all(g.prunable for g in groups)
    ga = only(groups, lambda g: g.consumers and g.consumers[0].node.name == "ca")
    gb = only(groups, lambda g: g.consumers and g.consumers[0].node.name == "cb")
    assert [(e.node.name, e.input_index, e.position, e.kind) for e in ga.shape_edits] == [("split", 1, 0, "size")]
    edits = {(e.node.name, e.input_index, e.kind) for e in gb.shape_edits}
    assert edits == {("split", 1, "size"), ("slice", 1, "bound"), ("slice", 2, "bound")}
    end = only(gb.shape_edits, lambda e: e.node.name == "slice" and e.input_index == 2)
    assert end.axis_length == 5 and end.new_value(-1, [0]) == 3
    start = only(gb.shape_edits, lambda e: e.node.name == "slice" and e.input_index == 1)
    assert start.new_value(1, [0, 1]) == 1
    check_numerically(model, ga)
    check_numerically(model, gb)


def test_split_halves_recombined_couple_channels():
    # GLU-style: a * sigmoid(b) with a, b the halves of one conv output couples c and c + 4
    b = Builder(16)
    y = b.conv("x", 2, 8, "c")
    h0, h1 = b.op("Split", [y], "split", outputs=2, axis=1)
    z = b.op("Mul", [h0, b.op("Sigmoid", [h1], "sig")], "glu")
    b.conv(z, 4, 2, "c2", k=1)
    model = b.model([("x", [1, 2, 4, 4])], [("c2", None)])
    g = producing(analyze_channels(model), "c")
    assert g.size == 4 and sorted(p.offset for p in g.producers) == [0, 4]
    assert [(e.attribute, e.input_index, e.position) for e in g.shape_edits] == [(None, None, 0), (None, None, 1)]
    check_numerically(model, g, activations=False)


def test_transpose_to_channels_last_matmul():
    b = Builder(17)
    y = b.op("Relu", [b.conv("x", 2, 5, "c")], "r")
    t = b.op("Transpose", [y], "nhwc", perm=[0, 2, 3, 1])
    b.op("MatMul", [t, b.weight("w", (5, 3))], "mm")
    model = b.model([("x", [1, 2, 3, 3])], [("mm", None)])
    g = producing(analyze_channels(model), "c")
    assert g.prunable and consumer_slices(g) == {("mm", 0, 0, 1)}
    assert ("nhwc", 3) in {(m.value.name, m.axis) for m in g.activations}
    check_numerically(model, g)


def test_shared_weight_couples_both_users():
    b = Builder(18)
    xa = b.op("Relu", [b.conv("x", 2, 4, "ca")], "ra")
    xb = b.op("Relu", [b.conv("x", 2, 4, "cb")], "rb")
    w = b.weight("shared", (3, 4, 1, 1))
    ya = b.op("Conv", [xa, w], "sa")
    yb = b.op("Conv", [xb, w], "sb")
    b.conv(b.op("Add", [ya, b.op("Relu", [yb], "rr")], "sum"), 3, 2, "head", k=1)
    model = b.model([("x", [1, 2, 4, 4])], [("head", None)])
    a = analyze_channels(model)
    out = producing(a, "sa")
    assert producer_nodes(out) == {"sa", "sb"} and out.prunable
    assert [(t.value.name, t.axis) for t in out.tensor_cuts()].count(("shared", 0)) == 1
    inp = producing(a, "ca")
    assert producing(a, "cb") is inp  # both inputs of the shared weight are one space
    check_numerically(model, out)
    check_numerically(model, inp)


def test_padding_spatial_is_fine_channel_padding_freezes():
    b = Builder(19)
    y = b.conv("x", 2, 3, "c1")
    y = b.op("Pad", [y, b.const("p1", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], "pad_hw")
    y = b.conv(y, 3, 4, "c2")
    y = b.op("Pad", [y, b.const("p2", np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64))], "pad_c")
    b.conv(y, 5, 2, "c3")
    model = b.model([("x", [1, 2, 4, 4])], [("c3", None)])
    a = analyze_channels(model)
    assert producing(a, "c1").prunable
    frozen = producing(a, "c2")
    assert frozen.frozen and any("Pad 'pad_c' pads the channel axis" in r for r in frozen.reasons)
    check_numerically(model, producing(a, "c1"))


def test_resize_spatial_only():
    b = Builder(20)
    y = b.conv("x", 2, 3, "c1")
    empty = b.const("roi", np.array([], np.float32))
    y = b.op("Resize", [y, empty, b.const("sc", np.array([1, 1, 2, 2], np.float32))], "up")
    y = b.conv(y, 3, 4, "c2")
    y = b.op("Resize", [y, empty, b.const("sc2", np.array([1, 2, 1, 1], np.float32))], "bad")
    b.conv(y, 8, 2, "c3")
    model = b.model([("x", [1, 2, 4, 4])], [("c3", None)])
    a = analyze_channels(model)
    assert producing(a, "c1").prunable
    assert any("Resize 'bad' rescales the channel axis" in r for r in producing(a, "c2").reasons)
    check_numerically(model, producing(a, "c1"))


def test_graph_output_shape_reader_and_unknown_op_freeze():
    b = Builder(21)
    y1 = b.op("Relu", [b.conv("x", 2, 3, "c1")], "r1")  # also a graph output
    y2 = b.op("Relu", [b.conv(y1, 3, 4, "c2")], "r2")
    b.op("Shape", [y2], "shape_3")
    y3 = b.conv(y2, 4, 5, "c3")
    b.nodes.append(oh.make_node("Foo", [y3], ["foo"], name="foo_node", domain="custom"))
    y4 = b.conv(y3, 5, 2, "c4")
    y5 = b.op("Shape", [y4], "tail_shape", start=2)  # reads spatial dims only: fine
    proto = make_proto(b.nodes, [("x", [1, 2, 4, 4])], [("r1", None), ("foo", None), ("c4", None)], b.inits)
    proto.graph.output.append(oh.make_tensor_value_info(y5, onnx.TensorProto.INT64, None))
    proto.opset_import.append(oh.make_opsetid("custom", 1))
    a = analyze_channels(io.load_model(proto, check=False))
    assert producing(a, "c1").reasons == ["graph output 'r1'"]
    assert producing(a, "c2").reasons == ["read by Shape node 'shape_3'"]
    assert producing(a, "c3").reasons == ["'c3' is consumed by unknown op custom::Foo (node 'foo_node')"]
    assert producing(a, "c4").reasons == ["graph output 'c4'"]


def test_non_constant_weight_and_softmax_over_channels():
    b = Builder(22)
    y = b.op("Relu", [b.conv("x", 2, 3, "c1")], "r1")
    y = b.op("Conv", [y, "w_in"], "dyn")
    z = b.op("Relu", [b.conv("x", 2, 3, "c2")], "r2")
    z = b.op("Softmax", [z], "sm", axis=1)
    b.conv(z, 3, 2, "c3")
    model = b.model([("x", [1, 2, 4, 4]), ("w_in", [4, 3, 1, 1])], [("dyn", None), ("c3", None)])
    a = analyze_channels(model)
    assert producing(a, "c1").reasons == ["weight 'w_in' of Conv 'dyn' is a graph input"]
    assert any("Softmax 'sm' mixes values across the channel axis 1" in r for r in producing(a, "c2").reasons)


def test_opset_aware_rules():
    # Softmax before opset 13 normalizes over axes [axis, rank): axis=1 on NCHW mixes channels;
    # from opset 13 only `axis` itself (here the last axis) is mixed.
    old = CHANNEL_RULES.get("", "Softmax", 11)
    new = CHANNEL_RULES.get("", "Softmax", 13)
    node = ir.Node("", "Softmax", [], attributes=[ir.AttrInt64("axis", 2)])
    assert set(old.mixes(node, 4)) == {2, 3} and set(new.mixes(node, 4)) == {2}
    # Split sizes: an attribute before opset 13, an input from 13.
    for opset in (11, 13):
        b = Builder(23)
        y = b.conv("x", 2, 6, "c")
        sizes = {"split": [2, 4]} if opset == 11 else {}
        ins = [y] if opset == 11 else [y, b.const("sizes", np.array([2, 4], np.int64))]
        s0, s1 = b.op("Split", ins, "split", outputs=2, axis=1, **sizes)
        b.conv(s0, 2, 1, "ca", k=1)
        b.conv(s1, 4, 1, "cb", k=1)
        model = b.model([("x", [1, 2, 4, 4])], [("ca", None), ("cb", None)], opset=opset)
        a = analyze_channels(model)
        groups = [g for g in a.groups if producer_nodes(g) == {"c"}]
        assert sorted(g.size for g in groups) == [2, 4] and all(g.prunable for g in groups)
        e = groups[0].shape_edits[0]
        assert (e.attribute, e.input_index) == (("split", None) if opset == 11 else (None, 1))


def test_subgraph_capture_freezes():
    b = Builder(24)
    y = b.op("Relu", [b.conv("x", 2, 3, "c")], "r")
    then_g = oh.make_graph([oh.make_node("Identity", [y], ["t_out"])], "then", [],
                           [oh.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, None)])
    else_g = oh.make_graph([oh.make_node("Neg", [y], ["e_out"])], "else", [],
                           [oh.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, None)])
    b.nodes.append(oh.make_node("If", ["cond"], ["if_out"], name="branch", then_branch=then_g, else_branch=else_g))
    b.conv(y, 3, 2, "c2")
    model = b.model([("x", [1, 2, 4, 4]), ("cond", [], onnx.TensorProto.BOOL)], [("if_out", None), ("c2", None)])
    g = producing(analyze_channels(model), "c")
    assert g.frozen and "'r' is captured by a subgraph of If 'branch'" in g.reasons


def test_conv_transpose_plain_and_depthwise():
    b = Builder(25)
    y = b.op("Relu", [b.conv("x", 2, 4, "c1")], "r1")
    y = b.op("ConvTranspose", [y, b.weight("ct.w", (4, 3, 2, 2)), b.weight("ct.b", (3,))], "ct", strides=[2, 2])
    y = b.op("Relu", [y], "r2")
    y = b.op("ConvTranspose", [y, b.weight("dct.w", (3, 2, 3, 3)), b.weight("dct.b", (6,))], "dct", group=3)
    b.conv(b.op("Relu", [y], "r3"), 6, 2, "c2", k=1)
    model = b.model([("x", [1, 2, 3, 3])], [("c2", None)])
    a = analyze_channels(model)
    g1 = producing(a, "c1")
    assert g1.prunable and consumer_slices(g1) == {("ct", 0, 0, 1)}  # ConvTranspose weight [in, out, ...]
    g2 = producing(a, "ct")
    assert g2.prunable and producer_nodes(g2) == {"ct", "dct"}
    (p,) = [p for p in g2.producers if p.node.name == "ct"]
    assert (p.axis, p.bias.name) == (1, "ct.b")
    (dp,) = [p for p in g2.producers if p.node.name == "dct"]
    assert dp.depthwise and (dp.axis, dp.block, dp.bias_block) == (0, 1, 2)  # weight axis 0 = the group
    assert consumer_slices(g2) == {("c2", 1, 0, 2)}  # multiplier 2
    check_numerically(model, g1)
    check_numerically(model, g2)


def test_squeeze_excitation_couples_gate_with_features():
    b = Builder(26)
    y = b.op("Relu", [b.bn(b.conv("x", 2, 6, "c1"), 6, "bn")], "r1")
    s = b.op("ReduceMean", [y], "squeeze", axes=[2, 3], keepdims=0)
    s = b.op("Relu", [b.op("Gemm", [s, b.weight("se1.w", (3, 6)), b.weight("se1.b", (3,))], "se1", transB=1)], "se_r")
    s = b.op("Gemm", [s, b.weight("se2.w", (3, 6)), b.weight("se2.b", (6,))], "se2")
    s = b.op("Sigmoid", [s], "gate")
    s = b.op("Unsqueeze", [s, b.const("axes", np.array([2, 3], np.int64))], "unsq")
    y = b.op("Mul", [y, s], "excite")
    b.conv(y, 6, 2, "c2")
    model = b.model([("x", [1, 2, 4, 4])], [("c2", None)])
    a = analyze_channels(model)
    g = producing(a, "c1")
    assert g.prunable and producer_nodes(g) == {"c1", "se2"}
    assert consumer_slices(g) == {("se1", 1, 0, 1), ("c2", 1, 0, 1)}
    assert ("unsq", 1) in {(m.value.name, m.axis) for m in g.activations}
    hidden = producing(a, "se1")
    assert hidden.prunable and consumer_slices(hidden) == {("se2", 0, 0, 1)}
    check_numerically(model, g, activations=False)
    check_numerically(model, hidden)


def test_instance_norm_and_prelu_params():
    b = Builder(27)
    y = b.conv("x", 2, 4, "c1")
    y = b.op("InstanceNormalization", [y, b.weight("in.s", (4,)), b.weight("in.b", (4,))], "inorm")
    y = b.op("PRelu", [y, b.weight("slope", (4, 1, 1))], "prelu")
    b.conv(y, 4, 2, "c2")
    model = b.model([("x", [1, 2, 4, 4])], [("c2", None)])
    g = producing(analyze_channels(model), "c1")
    assert g.prunable
    assert {(p.node.name, p.input_index, p.axis) for p in g.params} == {("inorm", 1, 0), ("inorm", 2, 0), ("prelu", 1, 0)}
    check_numerically(model, g)


def test_weight_with_an_unknown_second_use_freezes():
    b = Builder(28)
    y = b.op("Relu", [b.conv("x", 2, 4, "c1")], "r1")
    w = b.weight("w2", (3, 4, 1, 1))
    y2 = b.op("Conv", [y, w], "c2")
    b.nodes.append(oh.make_node("Foo", [w], ["foo"], name="peek", domain="custom"))
    b.conv(y2, 3, 2, "c3", k=1)
    y3 = b.op("Gemm", ["v", b.weight("gw", (3, 5))], "gemm_t", transA=1)
    proto = make_proto(b.nodes, [("x", [1, 2, 4, 4]), ("v", [3, 2])], [("c3", None), ("foo", None), (y3, None)], b.inits)
    proto.opset_import.append(oh.make_opsetid("custom", 1))
    a = analyze_channels(io.load_model(proto, check=False))
    reason = "'w2' is consumed by unknown op custom::Foo (node 'peek')"
    assert reason in producing(a, "c1").reasons  # the input side of w2
    assert reason in producing(a, "c2").reasons  # the output side of w2
    assert not any(p.node.name == "gemm_t" for g in a.groups for p in g.producers)  # transA=1


def test_reduce_squeeze_unsqueeze_resize_chain():
    b = Builder(29)
    y = b.op("Relu", [b.conv("x", 2, 4, "c1")], "r1")
    y = b.op("ReduceMax", [y], "rmax", axes=[2], keepdims=1)  # [1,4,1,5]
    y = b.op("Squeeze", [y, b.const("ax2", np.array([2], np.int64))], "sq")  # [1,4,5]
    y = b.op("Unsqueeze", [y, b.const("ax2b", np.array([2], np.int64))], "usq")  # [1,4,1,5]
    empty = b.const("roi", np.array([], np.float32))
    sizes = b.const("sizes", np.array([1, 4, 3, 5], np.int64))
    y = b.op("Resize", [y, empty, "", sizes], "rs")  # [1,4,3,5]
    b.conv(y, 4, 2, "c2")
    model = b.model([("x", [1, 2, 3, 5])], [("c2", None)])
    g = producing(analyze_channels(model), "c1")
    assert g.prunable and consumer_slices(g) == {("c2", 1, 0, 1)}
    assert {(m.value.name, m.axis) for m in g.activations} >= {("rmax", 1), ("sq", 1), ("usq", 1), ("rs", 1)}
    (edit,) = g.shape_edits
    assert (edit.node.name, edit.input_index, edit.position, edit.kind) == ("rs", 3, 1, "size")
    check_numerically(model, g)


def test_slice_attributes_before_opset_10():
    b = Builder(30)
    y = b.op("Relu", [b.conv("x", 2, 6, "c1")], "r1")
    y = b.op("Slice", [y], "sl", starts=[2], ends=[5], axes=[1])
    b.conv(y, 3, 2, "c2")
    model = b.model([("x", [1, 2, 4, 4])], [("c2", None)], opset=9)
    a = analyze_channels(model)
    kept = only(a.groups, lambda g: producer_nodes(g) == {"c1"} and g.consumers)
    assert kept.size == 3 and kept.producers[0].offset == 2
    assert {(e.attribute, e.position, e.kind) for e in kept.shape_edits} == {("starts", 0, "bound"), ("ends", 0, "bound")}
    check_numerically(model, kept)


def test_add_of_concat_and_conv_splits_the_conv_space():
    b = Builder(31)
    y1 = b.op("Relu", [b.conv("x", 2, 3, "b1")], "r1")
    y2 = b.op("Relu", [b.conv("x", 2, 4, "b2")], "r2")
    cat = b.op("Concat", [y1, y2], "cat", axis=1)
    s = b.op("Add", [cat, b.conv("x", 2, 7, "wide")], "sum")
    b.conv(b.op("Relu", [s], "r3"), 7, 2, "head")
    model = b.model([("x", [1, 2, 4, 4])], [("head", None)])
    a = analyze_channels(model)
    g1, g2 = producing(a, "b1"), producing(a, "b2")
    assert {(p.node.name, p.offset) for p in g1.producers} == {("b1", 0), ("wide", 0)}
    assert {(p.node.name, p.offset) for p in g2.producers} == {("b2", 0), ("wide", 3)}
    assert consumer_slices(g2) == {("head", 1, 3, 1)}
    check_numerically(model, g1)
    check_numerically(model, g2)


def test_analysis_does_not_modify_the_model():
    model = _residual()
    before = ir.to_proto(model).SerializeToString()
    analyze_channels(model)
    assert ir.to_proto(model).SerializeToString() == before


# ------------------------------------------------------------------------------------------
# Shipped models
# ------------------------------------------------------------------------------------------


def test_shipped_cnn():
    model = io.load_model(MODELS / "digits_cnn.onnx")
    a = analyze_channels(model)
    # by hand: image(1, frozen), stem+res.conv2+Add (16), res.conv1 (16), down+depthwise (32),
    # pointwise (32), b1 (24), b3 (24), fc/logits (10, frozen)
    assert [(g.size, g.prunable) for g in a.groups] == [
        (1, False), (16, True), (16, True), (32, True), (32, True), (24, True), (24, True), (10, False)
    ]
    res = producing(a, "/stem/stem.0/Conv")
    assert producer_nodes(res) == {"/stem/stem.0/Conv", "/res/conv2/Conv"}
    assert {m.node.name for m in res.consumers} == {"/res/conv1/Conv", "/down/down.0/Conv"}
    dw = producing(a, "/down/down.0/Conv")
    assert producer_nodes(dw) == {"/down/down.0/Conv", "/dwsep/dw/dw.0/Conv"}
    assert [m.node.name for m in dw.consumers] == ["/dwsep/pw/pw.0/Conv"]
    assert consumer_slices(producing(a, "/branches/b1/b1.0/Conv")) == {("/fc/Gemm", 1, 0, 1)}
    assert consumer_slices(producing(a, "/branches/b3/b3.0/Conv")) == {("/fc/Gemm", 1, 24, 1)}
    assert len(producing(a, "/dwsep/pw/pw.0/Conv").consumers) == 2
    for g in a.groups:
        assert all("could not be analysed" not in r for r in g.reasons)
    for seed, g in enumerate(a.prunable):
        check_numerically(model, g, seed=seed)


def test_shipped_mlp():
    model = io.load_model(MODELS / "digits_mlp.onnx")
    a = analyze_channels(model)
    assert [(g.size, g.prunable) for g in a.groups] == [(1024, False), (256, True), (128, True), (10, False)]
    h1 = producing(a, "/fc1/Gemm")
    (p,) = h1.producers
    assert (p.value.name, p.axis, p.bias.name) == ("fc1.weight", 0, "fc1.bias")
    assert consumer_slices(h1) == {("/fc2/Gemm", 1, 0, 1)}
    for seed, g in enumerate(a.prunable):
        check_numerically(model, g, seed=seed)


def test_shipped_transformer():
    model = io.load_model(MODELS / "digits_transformer.onnx")
    a = analyze_channels(model)
    assert len(a.groups) == 13
    assert sorted((g.size, producer_nodes(g).pop()) for g in a.prunable) == [
        (128, "/layers.0/fc1/MatMul"), (128, "/layers.1/fc1/MatMul")
    ]
    for layer in (0, 1):
        g = producing(a, f"/layers.{layer}/fc1/MatMul")
        assert consumer_slices(g) == {(f"/layers.{layer}/fc2/MatMul", 0, 0, 1)}
        assert [p.value.name for p in g.params] == [f"layers.{layer}.fc1.bias"]
        check_numerically(model, g, seed=layer, activations=False)
        q = producing(a, f"/layers.{layer}/attn/q/MatMul")
        assert any("changes the channel axis" in r for r in q.reasons)
    stream = producing(a, "/embed/MatMul")
    assert len(stream.producers) == 5 and stream.frozen
    assert any("LayerNormalization" in r for r in stream.reasons)


# ------------------------------------------------------------------------------------------
# Property test: random CNN chains
# ------------------------------------------------------------------------------------------

_BLOCKS = ("conv", "bn", "relu", "res", "concat", "dw", "gconv", "pool", "split", "slice", "scale", "swish",
           "pad", "cconst", "shift")


def _random_chain(blocks, widths, seed):
    b = Builder(seed)
    x, c = b.conv("x", 3, widths[-1], "first"), widths[-1]
    for i, (kind, w) in enumerate(zip(blocks, widths)):
        n = f"{kind}{i}"
        if kind == "conv":
            x, c = b.conv(x, c, w, n), w
        elif kind == "bn":
            x = b.bn(x, c, n)
        elif kind == "relu":
            x = b.op("Relu", [x], n)
        elif kind == "res":
            y = b.op("Relu", [b.conv(x, c, w, n + "a")], n + "r")
            x = b.op("Add", [b.conv(y, w, c, n + "b"), x], n)
        elif kind == "concat":
            y1, y2 = b.conv(x, c, w, n + "a", k=1), b.conv(x, c, c, n + "b")
            x, c = b.op("Concat", [y1, b.op("Relu", [y2], n + "r")], n, axis=1), w + c
        elif kind == "dw":
            m = 1 + w % 2
            x, c = b.conv(x, c, c * m, n, group=c), c * m
        elif kind == "gconv" and c % 2 == 0:
            x, c = b.conv(x, c, 2 * w, n, group=2), 2 * w
        elif kind == "pool":
            x = b.op("AveragePool", [x], n, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        elif kind == "split" and c >= 2:
            h = c // 2
            s0, s1 = b.op("Split", [x, b.const(n + ".s", np.array([h, c - h], np.int64))], n, outputs=2, axis=1)
            x = b.op("Concat", [b.op("Relu", [s1], n + "r"), s0], n + "cat", axis=1)
        elif kind == "slice" and c >= 2:
            ins = [x, b.const(n + ".st", np.array([1], np.int64)), b.const(n + ".en", np.array([c], np.int64)),
                   b.const(n + ".ax", np.array([1], np.int64))]
            x, c = b.op("Slice", ins, n), c - 1
        elif kind == "scale":
            x = b.op("Mul", [x, b.weight(n + ".s", (1, c, 1, 1))], n)
        elif kind == "shift":
            x = b.op("Add", [b.weight(n + ".s", (c, 1, 1)), x], n)
        elif kind == "swish":
            x = b.op("Mul", [x, b.op("Sigmoid", [x], n + "s")], n)
        elif kind == "pad":
            x = b.op("Pad", [x, b.const(n + ".p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], n)
            x = b.op("MaxPool", [x], n + "p", kernel_shape=[3, 3])
        elif kind == "cconst":
            x, c = b.op("Concat", [x, b.weight(n + ".k", (1, w, 4, 4))], n, axis=1), c + w
    x = b.op("Flatten", [b.op("Relu", [x], "last_relu")], "flat")
    b.op("Gemm", [x, b.weight("fc.w", (c * 16, 3)), b.weight("fc.b", (3,))], "fc")
    return b.model([("x", [1, 3, 4, 4])], [("fc", None)])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(_BLOCKS), min_size=1, max_size=6),
    widths=st.lists(st.integers(2, 5), min_size=6, max_size=6),
    seed=st.integers(0, 1000),
    pick=st.integers(0, 1000),
)
def test_random_chains_partition_and_numerics(blocks, widths, seed, pick):
    model = _random_chain(blocks, widths, seed)
    a = analyze_channels(model)
    for g in a.groups:
        assert all("could not be analysed" not in r for r in g.reasons), g.reasons
        for m in g.members:
            if not isinstance(m, ShapeEdit) and m.value.const_value is not None:
                assert m.offset + g.size * m.block <= m.value.const_value.shape[m.axis]
    # every output (input) channel of every linear op belongs to exactly one group
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        shape = node.inputs[1].const_value.shape
        for kind in (Producer, Consumer):
            members = [(g, m) for g in a.groups for m in g.members if isinstance(m, kind) and m.node is node]
            if not members:
                assert kind is Consumer and node.attributes["group"].value > 1  # depthwise
                continue
            (axis,) = {m.axis for _, m in members}
            seen = sorted(i for g, m in members for i in m.indices(range(g.size)))
            assert seen == list(range(shape[axis])), (node.name, kind.__name__)
    prunable = [g for g in a.prunable if g.consumers]
    if prunable:  # none when e.g. a Slice cuts into a depthwise multiplier's block (frozen)
        check_numerically(model, prunable[pick % len(prunable)], seed=seed, activations="swish" not in blocks)
