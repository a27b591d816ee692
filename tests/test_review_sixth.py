"""Sixth-session review of the size route's compact storage and of the check's kinds read from
returned shapes: each test here failed before its fix."""

from __future__ import annotations

import numpy as np
import onnx
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
        inits += [(f"w{i}", (0.3 * rng.standard_normal((16, 32 if i == 0 else 16))).astype(np.float32)),
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


def _token_classifier(rng, w, *, vocab=50, dim=16, classes=12):
    """input_ids [N, T] (int64) -> embedding Gather -> MatMul -> Add: one tag score row per token,
    the bias making tag 0 ("outside any entity") the top tag of about half the tokens."""
    emb = np.random.default_rng(7).standard_normal((vocab, dim)).astype(np.float32)
    b = np.zeros(classes, np.float32)
    b[0] = 6.0
    nodes = [oh.make_node("Gather", ["emb", "input_ids"], ["e"]), oh.make_node("MatMul", ["e", "w"], ["m"]),
             oh.make_node("Add", ["m", "b"], ["logits"])]
    return make_proto(nodes, [("input_ids", ["N", "T"], onnx.TensorProto.INT64)], [("logits", ["N", "T", classes])],
                      [("emb", emb), ("w", w), ("b", b)])


def test_token_classifier_logits_are_not_read_as_ctc():
    """A token classifier (NER tags) returns raw logits [N, T, C] of a projection whose first class
    tops about half the tokens: the CTC-logits rule read it as a sequence (decoded-sequence agreement
    after collapsing repeats and dropping 'blanks') before the fix. One step per token of an integer
    input is a tag per token, not CTC: it is judged per token by top-1 agreement (twelfth session:
    raw tag scores judged by cosine hid re-tagged tokens, tests/test_sweep_twelfth.py)."""
    from onnxcomp.check import CheckConfig, check_model, output_kinds, returned_kind, split_data
    from onnxcomp.data import Dataset

    rng = np.random.default_rng(11)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    ref = io.load_model(_token_classifier(rng, w))
    cand = io.load_model(_token_classifier(rng, w + (0.05 * rng.standard_normal(w.shape)).astype(np.float32)))
    feeds = [{"input_ids": rng.integers(0, 50, (2, 20)).astype(np.int64)} for _ in range(6)]
    logits = run_model(ref, feeds[:1])[0][0]
    share = float(np.mean(logits.argmax(-1) == 0))
    assert 0.5 <= share < 1.0  # what the CTC-logits rule looks for
    declared = output_kinds(ref)["logits"]
    assert str(declared) == "values"
    assert returned_kind(declared, logits, batch=2, token_shapes={(2, 20)}).kind == "scores"
    split = split_data(None, CheckConfig(), evaluation=Dataset(feeds, ref))
    report = check_model(ref, cand, split, CheckConfig(), compressed=1)
    row = report["outputs"][0]
    assert row["kind"] == "scores" and row["rule"] == "top-1 agreement >= 0.99"
    r = np.concatenate([o[0] for o in run_model(ref, feeds)]).argmax(-1)
    c = np.concatenate([o[0] for o in run_model(cand, feeds)]).argmax(-1)
    assert row["decisions"] == r.size and row["top1_agreement"] == pytest.approx(float(np.mean(r == c)))
    # the same logits with no integer input of their [N, T] are still read as CTC
    assert returned_kind(declared, logits, batch=2).kind == "sequence"


def test_compaction_of_a_graph_whose_names_are_already_short(rng):
    """Tensors named like the short names compaction hands out ('a', 'b', ...): renaming one
    initializer to 'b' while the initializer 'b' was still registered raised ValueError before the
    fix. Every name ends unique, graph inputs and outputs keep theirs, the model computes the same."""
    from onnxcomp.graph import ORIGINAL_NAMES
    from onnxcomp.passes.compact import CompactGraphPass

    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["a"], ["c"]), oh.make_node("Reshape", ["c", "d"], ["e"]),
             oh.make_node("Gemm", ["e", "g", "h"], ["y"], transB=1)]
    proto = make_proto(nodes, [("x", ["N", 2, 4, 4])], [("y", ["N", 5])],
                       [("g", f(5, 48)), ("h", f(5)), ("w", f(3, 2, 3, 3)), ("b", f(3)),
                        ("d", np.array([0, -1], np.int64))], opset=18)
    model, before = io.load_model(proto), io.load_model(proto)
    stats = CompactGraphPass()(model).stats
    assert stats["renamed"] > 0
    names = [v.name for v in model.graph.initializers.values()] + [o.name for n in model.graph for o in n.outputs]
    assert len(names) == len(set(names))
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]
    original = model.meta[ORIGINAL_NAMES]  # each new name maps to the tensor's first name
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(),
                                      before.graph.initializers[original[name]].const_value.numpy(), err_msg=name)
    assert_equivalent(before, io.load_model(io.model_to_bytes(model)), [{"x": f(2, 2, 4, 4)}], atol=1e-5, rtol=1e-5)


def test_the_kind_note_says_but_only_when_the_declared_shape_disagrees():
    """A declared shape that admits the returned one (symbols) but reads as another kind: the note
    said 'declares [N, T, 12] but returns [1, 16, 12]' before the fix, as if the shapes disagreed."""
    from onnxcomp.check import output_kinds, returned_kind

    proto = make_proto([oh.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["N", "T", 12])], [("y", ["N", "T", 12])],
                       [("w", np.eye(12, dtype=np.float32))])
    declared = output_kinds(io.load_model(proto))["y"]
    logits = np.zeros((1, 16, 12), np.float32)
    logits[..., 0] = 1.0
    logits[0, 3:6, 4] = 2.0
    judged = returned_kind(declared, logits, batch=1)
    assert judged.kind == "sequence" and judged.note == (
        "output 'y' declares [N, T, 12] and returns [1, 16, 12]: judged as sequence from the returned shape, "
        "not values")
    wrong = io.load_model(proto)
    wrong.graph.outputs[0].shape = ir.Shape([1, "T"])  # as a wrong export declares it (checker refuses the file)
    assert returned_kind(output_kinds(wrong)["y"], logits, batch=1).note.startswith(
        "output 'y' declares [1, T] but returns [1, 16, 12]")


def test_token_tag_probabilities_are_judged_per_token():
    """The same token classifier ending in a Softmax: a Softmax of rank 3 read as CTC steps
    (decoded-sequence agreement: a tag flipped inside a run of equal tags is invisible after
    collapsing repeats) before the fix; one step per token of an integer input is judged per token
    (top-1 agreement), which sees the flipped tags."""
    from onnxcomp.check import CheckConfig, check_model, split_data
    from onnxcomp.data import Dataset

    def softmaxed(w):
        proto = _token_classifier(None, w)
        proto.graph.node.append(oh.make_node("Softmax", ["logits"], ["tags"], axis=-1))
        proto.graph.output[0].name = "tags"
        return io.load_model(proto)

    rng = np.random.default_rng(12)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    ref, cand = softmaxed(w), softmaxed(w + (0.3 * rng.standard_normal(w.shape)).astype(np.float32))
    feeds = [{"input_ids": rng.integers(0, 50, (2, 20)).astype(np.int64)} for _ in range(6)]
    r = np.concatenate([o[0] for o in run_model(ref, feeds)]).argmax(-1)
    c = np.concatenate([o[0] for o in run_model(cand, feeds)]).argmax(-1)
    split = split_data(None, CheckConfig(), evaluation=Dataset(feeds, ref))
    report = check_model(ref, cand, split, CheckConfig(), compressed=1)
    row = report["outputs"][0]
    assert row["kind"] == "scores" and row["rule"] == "top-1 agreement >= 0.99"
    assert row["top1_agreement"] == pytest.approx(float(np.mean(r == c)))
    assert row["decisions"] == r.size and 0.5 < row["top1_agreement"] < 0.99 and not report["met"]
    assert report["kind_note"] == ("output 'tags' declares [N, T, 12] and returns [2, 20, 12]: judged as scores "
                                   "from the returned shape, not sequence")


def test_sparse_format_reports_the_codebook_bytes_it_stores(rng):
    """Codebooks of different sizes (layers shared at 2 bits, the output layer widened to 4) share one
    int8 table of max-K rows: the reported bytes_after counted each codebook unpadded before the fix.
    It now equals the bytes of what is stored: the packed stream, the int8 table, its scales."""
    from onnxcomp.sparsity.passes import SparsityConfig, sparsify

    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("Gemm", ["x", "w0", "b0"], ["h0"], transB=1), oh.make_node("Relu", ["h0"], ["r0"]),
             oh.make_node("Gemm", ["r0", "w1", "b1"], ["h1"], transB=1), oh.make_node("Relu", ["h1"], ["r1"]),
             oh.make_node("Gemm", ["r1", "w2", "b2"], ["y"], transB=1)]
    model = io.load_model(make_proto(nodes, [("x", ["N", 24])], [("y", ["N", 10])],
                                     [("w0", f(32, 24)), ("b0", f(32)), ("w1", f(32, 32)), ("b1", f(32)),
                                      ("w2", f(10, 32)), ("b2", f(10))], opset=18))
    calib = [{"x": f(4, 24)} for _ in range(16)]
    sparsify(model, SparsityConfig(ratio=0.5, refit=True, min_elements=100, share_bits=2, share_bits_max=4,
                                   share_tolerance=0.0), calib)
    sizes = sorted(np.unique(v.const_value.numpy()).size for n, v in model.graph.initializers.items()
                   if n.startswith("w"))
    assert sizes[0] <= 4 < sizes[-1]  # codebooks of different sizes
    stats = ClusterPass(ClusterConfig(format="sparse", bits=4, min_elements=100, channel_scales="never",
                                      codebook_int8=True))(model).stats
    stored = {n: v.const_value.nbytes for n, v in model.graph.initializers.items()
              if n in ("sparse_labels_packed", "sparse_labels_codebook_q", "sparse_labels_codebook_scales")}
    assert len(stored) == 3, sorted(model.graph.initializers)
    assert stats["totals"]["bytes_after"] == sum(stored.values())
