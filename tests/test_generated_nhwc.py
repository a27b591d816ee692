"""Generated inputs (no data given) for an NHWC image input that a Transpose hands to a Conv."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

from onnxcomp import io
from onnxcomp.data import SPATIAL_SIZE, describe_free_dims, generated_feeds
from onnxcomp.runtime import run_model


def _pnet_like(perm=(0, 3, 1, 2), kernel=12) -> onnx.ModelProto:
    """MTCNN's P-Net as TensorFlow exports it: ``input [N, H, W, 3]`` -> Transpose to NCHW -> a Conv
    whose 12x12 receptive field a 1x1 image cannot fill."""
    rng = np.random.default_rng(0)
    w = oh.make_tensor("w", onnx.TensorProto.FLOAT, [4, 3, kernel, kernel],
                       rng.standard_normal((4, 3, kernel, kernel)).astype(np.float32).ravel())
    nodes = [oh.make_node("Transpose", ["input"], ["nchw"], perm=list(perm)),
             oh.make_node("Conv", ["nchw", "w"], ["y"], name="conv1")]
    shape = ["batch", "height", "width", 3] if perm == (0, 3, 1, 2) else ["batch", 3, "height", "width"]
    graph = oh.make_graph(nodes, "pnet", [oh.make_tensor_value_info("input", onnx.TensorProto.FLOAT, shape)],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4, None, None])], [w])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_the_spatial_axes_behind_a_transpose_get_an_image_size(tmp_path):
    path = tmp_path / "pnet.onnx"
    path.write_bytes(_pnet_like().SerializeToString())
    model = io.load_model(path)
    feeds, chosen = generated_feeds(model, count=2)
    # axes 1 and 2 of [N, H, W, 3] are the Conv's spatial axes 2 and 3 (perm [0, 3, 1, 2]); batch stays 1
    assert feeds[0]["input"].shape == (1, SPATIAL_SIZE, SPATIAL_SIZE, 3)
    said = describe_free_dims(chosen)[0]
    assert "height=64 (axis 1, a spatial axis of 'conv1')" in said and "width=64 (axis 2" in said
    out = run_model(model, [feeds[0]])[0]
    assert out[0].shape == (1, 4, SPATIAL_SIZE - 11, SPATIAL_SIZE - 11) and np.isfinite(out[0]).all()


def test_a_transpose_that_keeps_nchw_maps_axes_through_its_perm():
    # NCHW input, a Transpose swapping H and W: axes 2 and 3 still are the spatial ones
    feeds, _ = generated_feeds(io.load_model(_pnet_like(perm=(0, 1, 3, 2))), count=1)
    assert feeds[0]["input"].shape == (1, 3, SPATIAL_SIZE, SPATIAL_SIZE)


def test_a_kernel_wider_than_64_sets_its_extent_behind_the_transpose(tmp_path):
    path = tmp_path / "wide.onnx"
    path.write_bytes(_pnet_like(kernel=70).SerializeToString())
    feeds, _ = generated_feeds(io.load_model(path), count=1)
    assert feeds[0]["input"].shape == (1, 70, 70, 3)
