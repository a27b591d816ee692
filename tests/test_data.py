"""Calibration/evaluation data: every source kind, batching, and validation errors naming the input."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.data import Dataset, load_data, load_labels, model_inputs
from onnxcomp.errors import DataError


@pytest.fixture
def model(matmul_proto):
    return io.load_model(matmul_proto)


@pytest.fixture
def fixed_model():
    """Batch fixed at 1, two inputs."""
    proto = make_proto(
        [oh.make_node("Add", ["a", "b"], ["y"])],
        [("a", [1, 3, 4]), ("b", [1, 3, 4])],
        [("y", [1, 3, 4])],
    )
    return io.load_model(proto)


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_model_inputs(model, fixed_model):
    (spec,) = model_inputs(model)
    assert spec.name == "x" and spec.dtype == np.float32 and spec.shape == ("N", 16)
    assert [s.shape for s in model_inputs(fixed_model)] == [(1, 3, 4), (1, 3, 4)]


def test_npz_batch_one_by_default(model, tmp_path, rng):
    x = rng.standard_normal((5, 16)).astype(np.float32)
    ds = Dataset(_npz(tmp_path, x=x), model)
    feeds = list(ds)
    assert len(feeds) == ds.num_feeds == len(ds) == 5
    assert all(f["x"].shape == (1, 16) for f in feeds)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    assert len(list(ds)) == 5, "a dataset can be read again"


def test_npz_batch_size_on_dynamic_batch(model, tmp_path, rng):
    x = rng.standard_normal((7, 16)).astype(np.float32)
    feeds = list(Dataset(_npz(tmp_path, x=x), model, batch_size=3))
    assert [f["x"].shape[0] for f in feeds] == [3, 3, 1]
    assert len(list(Dataset(_npz(tmp_path, x=x), model, limit=2))) == 2


def test_batch_size_refused_on_fixed_batch(fixed_model, tmp_path):
    a = np.zeros((4, 3, 4), np.float32)
    with pytest.raises(DataError, match="fixed at 1"):
        Dataset(_npz(tmp_path, a=a, b=a), fixed_model, batch_size=2)


def test_folder_of_feeds(model, tmp_path, rng):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, n in enumerate((1, 2, 4)):
        _npz(folder, f"{i}.npz", x=rng.standard_normal((n, 16)).astype(np.float32))
    assert [f["x"].shape[0] for f in Dataset(folder, model)] == [1, 2, 4]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .npz files"):
        Dataset(empty, model)


def test_iterables_and_factories(model, rng):
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(3)]
    assert len(list(Dataset(feeds, model))) == 3
    ds = Dataset(lambda: iter(feeds), model)
    assert len(list(ds)) == 3 and len(list(ds)) == 3
    once = Dataset(iter(feeds), model)
    assert len(list(once)) == 3
    with pytest.raises(DataError, match="one-shot"):
        list(once)


class _Reader:
    """Shaped like onnxruntime.quantization.CalibrationDataReader."""

    def __init__(self, feeds, rewindable=True):
        self.feeds = feeds
        self.it = iter(feeds)
        if rewindable:
            self.rewind = lambda: setattr(self, "it", iter(self.feeds))

    def get_next(self):
        return next(self.it, None)


def test_calibration_data_reader(model, rng):
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(4)]
    ds = load_data(_Reader(feeds), model)
    assert len(list(ds)) == 4 and len(list(ds)) == 4
    one_shot = load_data(_Reader(feeds, rewindable=False), model)
    assert len(list(one_shot)) == 4
    with pytest.raises(DataError, match="rewind"):
        list(one_shot)


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"y": np.zeros((2, 16), np.float32)}, "missing model input(s) 'x'"),
        ({"x": np.zeros((2, 16), np.float32), "z": np.zeros((2, 1), np.float32)}, "'z' not an input"),
        ({"x": np.zeros((2, 16), np.float64)}, "'x' has dtype float64, the model expects float32"),
        ({"x": np.zeros((2, 4, 4), np.float32)}, "'x' has rank 3"),
        ({"x": np.zeros((2, 15), np.float32)}, "size 15 on axis 1"),
        ({"x": np.zeros((0, 16), np.float32)}, "empty data set"),
    ],
)
def test_npz_validation_errors(model, tmp_path, arrays, fragment):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError) as info:
        list(Dataset(path, model))
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_nan_and_inf_are_refused(model, tmp_path):
    x = np.zeros((3, 16), np.float32)
    x[2, 5] = np.nan
    with pytest.raises(DataError, match=r"sample 2: input 'x' holds 1 NaN/Inf"):
        list(Dataset(_npz(tmp_path, x=x), model))
    feeds = [{"x": np.full((1, 16), np.inf, np.float32)}]
    with pytest.raises(DataError, match="feed 0: input 'x' holds 16 NaN/Inf"):
        list(Dataset(feeds, model))


def test_mismatched_sample_counts(fixed_model, tmp_path):
    with pytest.raises(DataError, match="disagree on the number of samples"):
        Dataset(_npz(tmp_path, a=np.zeros((3, 3, 4), np.float32), b=np.zeros((2, 3, 4), np.float32)), fixed_model)


def test_bad_sources(model, tmp_path):
    with pytest.raises(DataError, match="not found"):
        Dataset(tmp_path / "missing.npz", model)
    bad = tmp_path / "bad.npz"
    bad.write_text("no")
    with pytest.raises(DataError, match="not a readable .npz"):
        Dataset(bad, model)
    with pytest.raises(DataError, match="empty data set"):
        list(Dataset([], model))
    with pytest.raises(DataError, match="single dict"):
        Dataset({"x": np.zeros((1, 16), np.float32)}, model)


def test_unbatched_model_input(tmp_path):
    """A model without a batch axis: an array with one more axis yields arr[i]."""
    proto = make_proto([oh.make_node("Relu", ["v"], ["y"])], [("v", [8])], [("y", [8])])
    m = io.load_model(proto)
    feeds = list(Dataset(_npz(tmp_path, v=np.ones((3, 8), np.float32)), m))
    assert [f["v"].shape for f in feeds] == [(8,)] * 3


def test_labels(tmp_path):
    np.save(tmp_path / "l.npy", np.array([1, 2, 3]))
    assert load_labels(tmp_path / "l.npy", expected=3).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="3 labels for 4 samples"):
        load_labels(tmp_path / "l.npy", expected=4)
    np.save(tmp_path / "f.npy", np.array([1.5]))
    with pytest.raises(DataError, match="integers"):
        load_labels(tmp_path / "f.npy")
