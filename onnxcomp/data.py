"""Calibration and evaluation data: one abstraction used by every command.

A :class:`Dataset` turns what the user has into a stream of *feeds* (``{input name: array}``),
each validated against the model's inputs, and can be iterated several times (calibration,
reconstruction and evaluation each read the data again; nothing is kept in memory between reads
except what the source itself holds).

Sources
-------
* an ``.npz`` file whose keys are the model's input names and whose axis 0 indexes samples;
  only the headers are read up front and then only the rows of the samples used (a compressed
  member is decompressed as a stream and left as soon as enough rows are read), so
  ``--max-samples 4`` on a huge file reads four samples;
* an ``.npy`` file holding one array, for a model with one required input (axis 0 indexes
  samples, as in an ``.npz``);
* a folder of ``.npz`` files, each one complete feed (for inputs whose shapes vary);
* a Python iterable of ``{name: ndarray}`` dicts (a list, or a callable returning a fresh iterator
  for data that cannot be held at once; a one-shot generator can be read only once);
* an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``), so code written for
  ``onnxruntime.quantization`` switches without changes; ``rewind()`` is called between reads
  when the reader has it.

Batching
--------
Arrays from an ``.npz`` file are cut along axis 0. A sample is fed with batch 1 (``arr[i:i+1]``)
unless the model's batch dimension is dynamic and a ``batch_size`` is asked for, in which case
``arr[i:i+batch_size]`` (the last batch may be shorter). A model whose batch dimension is fixed at
``B > 1`` is fed ``B`` samples at a time and the sample count must be a multiple of ``B``. When an
array has one more axis than the model's input and ``arr[i]`` fits the input's fixed dimensions
(a model without a batch axis, or samples saved with their own batch axis), sample ``i`` is
``arr[i]``.

Validation
----------
Each feed is checked against the model's graph inputs: missing or extra names, dtype, rank, fixed
dimensions, NaN/Inf, and an input of 0 rows (batch size 0: a feed without a sample, unless the
model fixes that axis at 0). Initializers that are also inputs (IR < 4 models) are optional, and
the data may not feed them: they are weights, compressed as constants. Errors raise
:class:`~onnxcomp.errors.DataError` naming the source, the input and the sample. An empty data set is
an error too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import ConfigError, DataError

__all__ = [
    "InputSpec",
    "model_inputs",
    "Dataset",
    "load_data",
    "load_labels",
    "DataSource",
    "parse_shapes",
    "synthetic_feed",
    "fill_free_dims",
    "describe_free_dims",
    "generated_feeds",
    "labels_argument",
    "eval_labels",
    "weight_fixed_dims",
    "MASK_INPUT_NAMES",
]

Feed = dict[str, np.ndarray]
DataSource = Union[str, os.PathLike, Iterable[Mapping[str, np.ndarray]], Callable[[], Iterable], Any]


#: ``ir.Value.meta`` key of a graph input whose shape a specialisation made static: ``(who, axes)``,
#: the phrase naming who fixed it (``--fix-shape x=1x3x32x32``) and the axes that were dynamic before
SHAPE_FIXED_BY = "onnxcomp.shape_fixed_by"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and shape (int for fixed dims, str/None for dynamic).
    ``fixed_by`` / ``fixed_axes``: who made which dynamic axes static (:data:`SHAPE_FIXED_BY`)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None
    optional: bool = False
    fixed_by: str = ""
    fixed_axes: tuple[int, ...] = ()

    def fixes(self, axis: int) -> str:
        """Who fixes ``axis`` at its size, for an error: the model, or the option that fixed it."""
        return self.fixed_by if self.fixed_by and axis in self.fixed_axes else "the model"

    @property
    def batch_dim(self) -> int | str | None:
        return self.shape[0] if self.shape else None

    def describe_shape(self) -> str:
        if self.shape is None:
            return "unknown"
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The model's graph inputs as :class:`InputSpec`; inputs backed by initializers are optional."""
    specs = []
    for value in model.graph.inputs:
        dtype = value.dtype
        np_dtype = np.dtype(dtype.numpy()) if dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(
                (d if d >= 0 else None) if isinstance(d, int) else (d.value or None)
                for d in value.shape
            )
        optional = value.name in model.graph.initializers
        fixed_by, fixed_axes = value.meta.get(SHAPE_FIXED_BY) or ("", ())
        specs.append(InputSpec(value.name, np_dtype, shape, optional, fixed_by, tuple(fixed_axes)))
    return specs


class Dataset:
    """A re-iterable stream of validated feeds for one model (see module docstring).

    Args:
        source: an .npz path, a folder of .npz files, an iterable or factory of feed dicts, or a
            ``CalibrationDataReader``-like object.
        model: the model whose inputs the feeds must match.
        batch_size: samples per feed for .npz sources (needs a dynamic batch dimension).
        limit: read at most this many feeds.
        check_finite: refuse NaN/Inf.
        ignore: names the data may hold that are not (or no longer) model inputs, dropped from
            every feed: inputs fixed to constants by ``--fix-input``.
    """

    def __init__(
        self,
        source: DataSource,
        model: ir.Model,
        *,
        batch_size: int | None = None,
        limit: int | None = None,
        check_finite: bool = True,
        ignore: Iterable[str] = (),
    ) -> None:
        for what, count in (("batch size", batch_size), ("limit", limit)):  # 2.5 or True would pass below
            if count is not None and (isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral)):
                raise DataError(f"{what} must be an integer, got {type(count).__name__} {count!r}")
        batch_size = None if batch_size is None else int(batch_size)
        limit = None if limit is None else int(limit)
        if not isinstance(model, ir.Model):  # a path, bytes or onnx.ModelProto, read as load_model reads them
            from onnxcomp.io import load_model

            model = load_model(model)
        self.inputs = model_inputs(model)
        self._weights = frozenset(model.graph.initializers)
        self._spans: dict[str, tuple[float, float]] = {}  # float inputs: span of the values read until they vary
        self.ignore = frozenset(ignore)
        self._by_name = {s.name: s for s in self.inputs}
        self.batch_size = batch_size
        self.limit = limit
        self.check_finite = check_finite
        self._reads = 0
        #: the feed last yielded, as errors name it (``calib.npz sample 5``): a consumer that fails
        #: on it can say which (:func:`onnxcomp.graph.stream_values`)
        self.reading: str | None = None
        if batch_size is not None and batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        self._arrays: dict[str, _StoredArray] | None = None
        self._files: list[Path] | None = None
        self._factory: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None
        self._reader: Any = None
        self._one_shot = False
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            self.name = str(path)
            if not path.exists():
                raise DataError(f"{path}: data file not found")
            if path.is_dir():
                self._files = sorted(path.glob("*.npz"))
                if not self._files:
                    npy = sum(1 for _ in path.glob("*.npy"))
                    raise DataError(f"{path}: folder holds no .npz files (empty data set)" + (
                        f"; its {npy} .npy file(s) are not read: a data folder holds one .npz file per feed, "
                        "its arrays named after the model's inputs (np.savez(f, NAME=array)), or give one "
                        ".npy file whose axis 0 indexes samples" if npy else ""))
            else:
                arrays = self._single_input(_stored_arrays(path))
                self._arrays = {k: a for k, a in arrays.items() if k not in self.ignore}
                self._check_arrays()
        elif hasattr(source, "get_next"):
            self.name = f"<{type(source).__name__}>"
            self._reader = source
        elif callable(source):
            self.name = f"<{getattr(source, '__name__', 'callable')}>"
            self._factory = source
        elif isinstance(source, Mapping):
            raise DataError(
                "data: a single dict was given; pass a list of feeds (or an .npz path for arrays "
                "whose axis 0 indexes samples)"
            )
        elif isinstance(source, Iterable):
            self.name = f"<{type(source).__name__}>"
            items = source
            self._one_shot = iter(source) is source
            self._factory = lambda: items
        else:
            raise DataError(
                f"data: cannot read {type(source).__name__}; pass an .npz file, a folder of .npz "
                "files, an iterable of {name: array} dicts or a CalibrationDataReader"
            )

    # -- sources --------------------------------------------------------------------------------
    def _single_input(self, arrays: dict[str, _StoredArray]) -> dict[str, _StoredArray]:
        """Name the array of an .npy file after the model's only required input."""
        if list(arrays) != [None]:
            return arrays
        required = [s.name for s in self.inputs if not s.optional]
        if len(required) != 1:
            raise DataError(
                f"{self.name}: an .npy file holds one unnamed array, but the model has "
                f"{len(required)} inputs ({', '.join(map(repr, required))}); save an .npz whose "
                "keys are the input names"
            )
        return {required[0]: arrays[None]}

    def _check_arrays(self) -> None:
        arrays = self._arrays
        assert arrays is not None
        self._check_names(arrays.keys(), where=self.name)
        for k, a in arrays.items():
            if a.ndim == 0:
                raise DataError(f"{self.name}: array {k!r} is a scalar; its axis 0 must index samples")
        counts = {k: a.shape[0] for k, a in arrays.items()}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{k}: {n}" for k, n in counts.items())
            raise DataError(f"{self.name}: arrays disagree on the number of samples (axis 0): {listing}")
        n = next(iter(counts.values()))
        if n == 0:
            name, stored = next(iter(arrays.items()))
            raise DataError(f"{self.name}: empty data set: array {name!r} holds 0 samples (shape {list(stored.shape)}, "
                            "axis 0 indexes samples); give at least one")
        self._num_samples = n
        self._step = self._feed_step()
        if n % self._step and self._fixed_batch():
            raise DataError(
                f"{self.name}: {n} samples cannot be cut into batches of {self._step}, the model's "
                f"fixed batch dimension"
            )

    def _fixed_batch(self) -> bool:
        return any(
            isinstance(s.batch_dim, int) and s.batch_dim > 1 and s.name in (self._arrays or {})
            for s in self.inputs
        )

    def _feed_step(self) -> int:
        arrays = self._arrays or {}
        fixed = {
            s.batch_dim
            for s in self.inputs
            if s.name in arrays and s.shape and isinstance(s.batch_dim, int)
            and arrays[s.name].ndim == len(s.shape)
        }
        if 0 in fixed:  # an empty batch holds no sample: no feed could be cut from the data
            spec = next(s for s in self.inputs if s.name in arrays and s.batch_dim == 0)
            raise DataError(
                f"{self.name}: input {spec.name!r} has its batch dimension (axis 0) fixed at 0 by "
                f"{spec.fixes(0)} {spec.describe_shape()}: a feed of it holds no sample; give axis 0 at least 1"
            )
        if self.batch_size is not None:
            if fixed and fixed != {self.batch_size}:
                raise DataError(
                    f"{self.name}: batch size {self.batch_size} asked, but the model's batch "
                    f"dimension is fixed at {sorted(fixed)[0]}"
                )
            return self.batch_size
        if fixed:
            return int(max(fixed))
        return 1

    def _check_names(self, names: Iterable[str], *, where: str) -> None:
        names = set(names) - self.ignore
        required = {s.name for s in self.inputs if not s.optional}
        known = {s.name for s in self.inputs}
        missing = sorted(required - names)
        # an initializer (listed as an input too, or no longer: the commands compress it as a weight)
        weights = sorted(n for n in names if n in self._weights)
        if weights:
            raise DataError(
                f"{where}: {', '.join(map(repr, weights))} {'is a weight' if len(weights) == 1 else 'are weights'} "
                "of the model (an initializer, also listed as a graph input as IR < 4 models list them): "
                "onnxcomp compresses it as a constant, which the data cannot replace; drop it from the data"
            )
        extra = sorted(names - known)
        if missing:
            raise DataError(
                f"{where}: missing model input(s) {', '.join(map(repr, missing))}; "
                f"the data has {', '.join(map(repr, sorted(names))) or 'nothing'}"
            )
        if extra:
            raise DataError(
                f"{where}: {', '.join(map(repr, extra))} not an input of the model; "
                f"model inputs: {', '.join(repr(s.name) for s in self.inputs)}"
            )

    def _raw_feeds(self) -> Iterator[tuple[str, Mapping[str, np.ndarray]]]:
        if self._arrays is not None:
            n, step = self._num_samples, self._step
            with contextlib.ExitStack() as stack:
                readers = {name: stack.enter_context(arr.rows()) for name, arr in self._arrays.items()}
                for i in range(0, n, step):
                    feed = {}
                    for name, arr in self._arrays.items():
                        rows = readers[name].read(min(step, n - i))
                        stacked = step == 1 and _is_stack_of_samples(arr, self._by_name[name])
                        feed[name] = rows[0] if stacked else rows
                    yield f"{self.name} sample {i}", feed
        elif self._files is not None:
            for path in self._files:
                feed = _read_npz(path)
                self._check_names(feed.keys(), where=str(path))
                yield str(path), feed
        elif self._reader is not None:
            if self._reads and not hasattr(self._reader, "rewind"):
                raise DataError(
                    f"{self.name}: the CalibrationDataReader has no rewind(), so it can be read only "
                    "once; give it a rewind() method or pass an .npz file"
                )
            if self._reads and hasattr(self._reader, "rewind"):
                self._reader.rewind()
            i = 0
            while True:
                feed = self._reader.get_next()
                if feed is None:
                    break
                if not isinstance(feed, Mapping):
                    raise DataError(f"{self.name} feed {i}: get_next() returned {type(feed).__name__}, not a dict "
                                    "of arrays (or None at the end)")
                yield f"{self.name} feed {i}", feed
                i += 1
        else:
            assert self._factory is not None
            items = self._factory()
            if self._reads and self._one_shot:
                raise DataError(
                    f"{self.name}: a one-shot iterator was given and it has been read already; pass a "
                    "list or a function returning a fresh iterator"
                )
            if not isinstance(items, Iterable) or isinstance(items, (Mapping, str, bytes)):
                raise DataError(f"{self.name}: the data function returned {type(items).__name__}, not an iterator "
                                "of {name: array} dicts")
            for i, feed in enumerate(items):
                if not isinstance(feed, Mapping):
                    raise DataError(f"{self.name} feed {i}: expected a dict of arrays, got {type(feed).__name__}")
                yield f"{self.name} feed {i}", feed

    # -- validation -----------------------------------------------------------------------------
    def _validate(self, where: str, feed: Mapping[str, Any]) -> Feed:
        self._check_names(feed.keys(), where=where)
        out: Feed = {}
        for name, value in feed.items():
            if name in self.ignore:
                continue
            spec = self._by_name[name]
            arr = np.asarray(value)
            if arr.dtype != spec.dtype:
                raise DataError(
                    f"{where}: input {name!r} has dtype {arr.dtype}, the model expects {spec.dtype}"
                )
            if spec.shape is not None:
                if arr.ndim != len(spec.shape):
                    raise DataError(
                        f"{where}: input {name!r} has rank {arr.ndim} (shape {list(arr.shape)}), the "
                        f"model expects rank {len(spec.shape)} {spec.describe_shape()}"
                    )
                for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
                    if isinstance(want, int) and want != got:
                        raise DataError(
                            f"{where}: input {name!r} has size {got} on axis {axis} (shape "
                            f"{list(arr.shape)}), {spec.fixes(axis)} fixes it at {want} {spec.describe_shape()}"
                        )
            if arr.ndim and arr.shape[0] == 0 and not (spec.shape and spec.batch_dim == 0):
                raise DataError(
                    f"{where}: input {name!r} has 0 rows (shape {list(arr.shape)}): a feed of batch size 0 holds no "
                    "sample, so there is nothing to calibrate on or compare; drop it from the data or give it a sample"
                )
            if self.check_finite and arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise DataError(f"{where}: input {name!r} holds {bad} NaN/Inf value(s)")
            out[name] = np.ascontiguousarray(arr)
        return out

    # -- public ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Feed]:
        for where, feed in self._feeds():
            self._note_spans(feed)
            self.reading = where
            yield feed

    def _feeds(self) -> Iterator[tuple[str, Feed]]:
        """``(where, validated feed)`` of each feed this view yields."""
        count = 0
        select = getattr(self, "_select", None)
        try:
            for index, (where, feed) in enumerate(self._raw_feeds()):
                if self.limit is not None and count >= self.limit:
                    break
                if select is not None and not select(index):
                    continue
                yield where, self._validate(where, feed)
                count += 1
        finally:
            self._reads += 1
        if count == 0:
            raise DataError(f"{self.name}: empty data set (no feeds)")

    def _note_spans(self, feed: Feed) -> None:
        for name, arr in feed.items():
            seen = self._spans.get(name)
            if arr.dtype.kind != "f" or not arr.size or (seen is not None and seen[0] != seen[1]):
                continue  # once an input is seen to vary, its span no longer matters (constant_inputs)
            lo, hi = float(arr.min()), float(arr.max())
            self._spans[name] = (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))

    def constant_inputs(self) -> dict[str, float] | None:
        """When every float input read so far held one value in every feed (data that is all
        ones, all zeros...): that value per input; otherwise (or before any read) None.

        A single constant input beside varying ones is normal (a recurrent state of zeros); every
        float input constant means the data cannot show the model what it will see."""
        if not self._spans or any(lo != hi for lo, hi in self._spans.values()):
            return None
        return {name: lo for name, (lo, _) in self._spans.items()}

    def __len__(self) -> int:
        """Number of feeds, when the source knows it (raises TypeError otherwise)."""
        n = self.num_feeds
        if n is None:
            raise TypeError(f"{self.name}: the number of feeds is not known in advance")
        return n

    @property
    def num_feeds(self) -> int | None:
        if self._arrays is not None:
            n = -(-self._num_samples // self._step)
        elif self._files is not None:
            n = len(self._files)
        else:
            return None
        select = getattr(self, "_select", None)
        if select is not None:
            n = sum(1 for i in range(n) if select(i))
        return min(n, self.limit) if self.limit is not None else n

    @property
    def num_samples(self) -> int | None:
        """Samples of an .npz/.npy source (axis 0 of its arrays, every feed); None for the others."""
        return self._num_samples if self._arrays is not None else None

    def check_first(self) -> None:
        """Validate the first feed now (names, dtypes, shapes) when the source is a file or folder,
        so that data that cannot match the model is refused before any work; other sources may be
        readable only once and are left to their first use."""
        if self._arrays is not None or self._files is not None:
            self.first()

    def check_all(self) -> None:
        """Validate every feed this view yields now (names, dtypes, shapes, NaN/Inf, feeds of 0
        rows), when the source is a file or folder, so that data found bad only at its 30th sample
        is refused before any work, not after an output was written; nothing is kept (each feed is
        read again when used). Other sources may be readable only once and are left to their use."""
        if self._arrays is not None or self._files is not None:
            for _ in self._feeds():
                pass

    def check_labels(self, labels: np.ndarray | None) -> None:
        """Refuse ``labels`` (of this evaluation data) whose count is not the number of samples,
        when that is known (an .npz/.npy source)."""
        n = self.num_samples
        if labels is not None and n is not None and len(labels) != n:
            raise DataError(f"--labels: {len(labels)} label(s) for the {n} sample(s) of the evaluation data {self.name}")

    def subset(self, select: Callable[[int], bool], *, name: str | None = None) -> Dataset:
        """A view of the feeds whose index (in the unfiltered stream) ``select`` accepts.

        Nothing is read or copied; ``limit`` of the view counts the feeds it yields.
        """
        view = copy.copy(self)
        view._spans = {}  # what this view reads, not what its source read
        outer = getattr(self, "_select", None)
        view._select = select if outer is None else (lambda i: outer(i) and select(i))
        if name is not None:
            view.name = name
        return view

    def with_limit(self, limit: int | None) -> Dataset:
        """A view of the same source that reads at most ``limit`` feeds (None: every feed). It
        shares the source's spans: what it reads counts for the source too (the constant-input
        note is made once, on whichever of them the stages read)."""
        view = copy.copy(self)
        view.limit = limit
        return view

    def first(self) -> Feed:
        """The first feed (used to build example inputs)."""
        for feed in self:
            return feed
        raise DataError(f"{self.name}: empty data set")  # pragma: no cover - __iter__ raises first


def load_data(
    source: DataSource | Dataset,
    model: ir.Model,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """A :class:`Dataset` for ``model`` from any supported source.

    A Dataset is returned as is, or as a view limited to ``limit`` feeds when it allows more
    (which notes what it reads in its source's spans: :meth:`Dataset.constant_inputs` of the
    source covers every read of a calibrating entry point).
    """
    if isinstance(source, Dataset):
        if limit is None or (source.limit is not None and source.limit <= limit):
            return source
        return source.with_limit(limit)
    return Dataset(source, model, batch_size=batch_size, limit=limit)


def load_labels(path: str | os.PathLike, *, expected: int | None = None) -> np.ndarray:
    """Integer class labels from a ``.npy`` file (or the ``labels`` key of an ``.npz`` file)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: labels file not found")
    try:
        loaded = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{p}: cannot read labels ({exc})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        if "labels" not in loaded.files:
            raise DataError(f"{p}: .npz labels file needs a 'labels' key; it has {loaded.files}")
        loaded = loaded["labels"]
    return _checked_labels(np.asarray(loaded), str(p), expected)


def labels_argument(labels: Any, *, expected: int | None = None) -> np.ndarray | None:
    """The ``labels`` argument of the Python API as :func:`load_labels` returns them: None, a path
    to a labels file, or integer class labels as any array-like (a list, an array ``[N]`` or
    ``[N, 1]``); DataError names what is wrong (floats, several classes a sample, negatives)."""
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        return load_labels(labels, expected=expected)
    try:
        array = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"labels: cannot read {type(labels).__name__} as integer class labels ({exc})") from None
    return _checked_labels(array, "labels", expected)


def eval_labels(labels: Any, eval_data: Any) -> np.ndarray | None:
    """:func:`labels_argument` of an API call that also takes ``eval_data``: labels without the
    evaluation data they label are refused (ConfigError) before any work."""
    labels = labels_argument(labels)
    if labels is not None and eval_data is None:
        raise ConfigError("labels need eval_data (they label the evaluation samples)")
    return labels


def _checked_labels(labels: np.ndarray, where: str, expected: int | None) -> np.ndarray:
    if labels.ndim > 1 and labels.shape[1:] != (1,) * (labels.ndim - 1):  # [N] or [N, 1]: one class a sample
        raise DataError(f"{where}: labels must hold one class per sample (shape [N]), got shape {list(labels.shape)}")
    labels = labels.reshape(-1)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        index = int(np.argmax(labels < 0))
        raise DataError(f"{where}: label {index} is {int(labels[index])}; labels are class indices, 0 or more")
    if expected is not None and labels.shape[0] != expected:
        raise DataError(f"{where}: {labels.shape[0]} labels for {expected} samples")
    return labels


def _is_stack_of_samples(arr: np.ndarray | _StoredArray, spec: InputSpec) -> bool:
    """True when ``arr[i]`` already has the model input's full shape (one more axis than it)."""
    if spec.shape is None or arr.ndim != len(spec.shape) + 1:
        return False
    return all(not isinstance(w, int) or w == g for w, g in zip(spec.shape, arr.shape[1:]))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of one feed file, whole."""
    arrays = {}
    for key, stored in _stored_arrays(path).items():
        if key is None:
            raise DataError(f"{path}: a folder of feeds holds .npz files of named arrays, not a single array")
        with stored.rows() as reader:
            arrays[key] = reader.read_all()
    return arrays


@dataclasses.dataclass(frozen=True)
class _StoredArray:
    """An array in an ``.npz`` member or an ``.npy`` file, known by its header until rows are read."""

    path: Path
    member: str | None  # None: the file is a .npy
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @contextlib.contextmanager
    def rows(self) -> Iterator[_RowReader]:
        """A reader of consecutive rows (axis 0), positioned at the first."""
        with contextlib.ExitStack() as stack:
            try:
                if self.member is None:
                    stream = stack.enter_context(open(self.path, "rb"))
                else:
                    archive = stack.enter_context(zipfile.ZipFile(self.path))
                    stream = stack.enter_context(archive.open(self.member))
                _read_npy_header(stream)
            except Exception as exc:  # the file changed or vanished since its header was read
                raise DataError(f"{self.path}: cannot read array {self._label()} ({_reason(exc)})") from None
            yield _RowReader(self, stream)

    def _label(self) -> str:
        return "of the .npy file" if self.member is None else repr(self.member.removesuffix(".npy"))


class _RowReader:
    """Reads rows of a :class:`_StoredArray` in order; never more bytes than the rows asked for."""

    def __init__(self, stored: _StoredArray, stream: Any) -> None:
        self.stored = stored
        self.stream = stream
        self._whole: np.ndarray | None = None
        self._next = 0

    def read_all(self) -> np.ndarray:
        shape = self.stored.shape
        return self.read(shape[0]) if shape else self._read_whole()

    def read(self, n: int) -> np.ndarray:
        s = self.stored
        if s.fortran_order or not s.shape:  # rows are not contiguous: read the whole array once
            whole = self._read_whole()
            out = whole[self._next : self._next + n]
        else:
            row_items = math.prod(s.shape[1:])
            want = n * row_items * s.dtype.itemsize
            buf = bytearray(want)
            view = memoryview(buf)
            got = 0
            while got < want:
                chunk = self._chunk(min(want - got, 1 << 24))
                if not chunk:
                    raise DataError(
                        f"{s.path}: array {s._label()} is truncated: its header says shape {list(s.shape)}, "
                        f"the data ends before row {self._next + got // max(1, row_items * s.dtype.itemsize)}"
                    )
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
            out = np.frombuffer(buf, dtype=s.dtype).reshape((n, *s.shape[1:]))
        self._next += n
        return out

    def _chunk(self, size: int) -> bytes:
        try:
            return self.stream.read(size)
        except Exception as exc:  # a corrupt member: bad CRC, bad deflate stream
            raise DataError(f"{self.stored.path}: array {self.stored._label()} is corrupt ({_reason(exc)})") from None

    def _read_whole(self) -> np.ndarray:
        if self._whole is None:
            s = self.stored
            count = math.prod(s.shape)
            data = self._chunk(count * s.dtype.itemsize)
            if len(data) < count * s.dtype.itemsize:
                raise DataError(f"{s.path}: array {s._label()} is truncated (header says shape {list(s.shape)})")
            self._whole = np.frombuffer(data, dtype=s.dtype, count=count).reshape(s.shape, order="F" if s.fortran_order else "C")
        return self._whole


def _read_npy_header(stream: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran order) from an .npy header; the stream is left at the data."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    return tuple(int(d) for d in shape), np.dtype(dtype), bool(fortran)


def _stored_arrays(path: Path) -> dict[str | None, _StoredArray]:
    """The arrays of an .npz file (by key) or of an .npy file (key None), headers only."""
    found: dict[str | None, _StoredArray] = {}
    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    raise DataError(f"{path}: not a readable .npz file (nor an .npy array)")
                f.seek(0)
                found[None] = _StoredArray(path, None, *_read_npy_header(f))
        else:
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    with archive.open(member) as f:
                        found[member.removesuffix(".npy")] = _StoredArray(path, member, *_read_npy_header(f))
    except DataError:
        raise
    except Exception as exc:  # zip, header and permission errors alike
        raise DataError(f"{path}: not a readable .npz file ({_reason(exc)})") from None
    for key, stored in found.items():
        if stored.dtype.hasobject:
            raise DataError(f"{path}: array {stored._label()} holds Python objects; only numeric arrays are read")
    if not found:
        raise DataError(f"{path}: .npz file holds no arrays (empty data set)")
    return found


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def parse_shapes(items: Sequence[str], *, flag: str = "--shape", allow_zero: bool = False) -> dict[str, tuple[int, ...]]:
    """``["x=1x3x224x224", ...]`` -> ``{"x": (1, 3, 224, 224)}``; ConfigError names a bad item.

    A dimension of 0 is refused unless ``allow_zero``: the shapes of generated inputs (latency
    feeds) must hold data, while a static shape given to a graph input (``--fix-shape``) may be
    empty (a cache of length 0)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: expected NAME=D0xD1x... with non-negative integers") from None
        if not allow_zero and 0 in shape:
            raise ConfigError(f"{flag} {item!r}: axis {shape.index(0)} is 0: a generated input of that shape holds "
                              "no data (nothing would be run); give every dimension at least 1")
        shapes[name] = shape
    return shapes


def fill_free_dims(
    inputs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]], *, value: int = 1,
    fixed: Mapping[str, Mapping[int, tuple[int, str]]] | None = None,
) -> tuple[dict[str, tuple[int, ...]], list[dict[str, Any]]]:
    """Shapes for generated inputs: every free (dynamic) dimension without a ``--shape`` set to
    ``value``, but where ``fixed`` (:func:`weight_fixed_dims`) knows the size a weight reads there.

    Returns the completed ``{name: shape}`` (``shapes`` wins where given) and one record per
    dimension set, ``{"input", "axis", "dim", "value"}`` (``dim`` is the symbolic name or ``"?"``;
    ``"reader"``: the node whose weight fixed it), so the caller can say what it chose. Inputs of
    unknown rank are left out (``synthetic_feed`` asks for a ``--shape`` for them).
    """
    filled = dict(shapes)
    chosen: list[dict[str, Any]] = []
    for spec in inputs:
        if spec.optional or spec.name in shapes or spec.shape is None:
            continue
        dims = []
        known = (fixed or {}).get(spec.name, {})
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis in known:
                size, reader, *role = known[axis]
                dims.append(size)
                chosen.append({"input": spec.name, "axis": axis, "dim": dim or "?", "value": size, "reader": reader,
                               **({"role": role[0]} if role else {})})
            else:
                dims.append(value)
                chosen.append({"input": spec.name, "axis": axis, "dim": dim or "?", "value": value})
        filled[spec.name] = tuple(dims)
    return filled, chosen


def weight_fixed_dims(model: ir.Model) -> dict[str, dict[int, tuple[int, str]]]:
    """Free last axes of graph inputs whose size a reader's constant weight fixes: input name ->
    ``{axis: (size, reader node)}``. The input may pass Unsqueeze/Squeeze on the way (axes that
    leave its last axis last); the reader is a MatMul, Gemm, LSTM, GRU or RNN taking it as its data
    input (:data:`onnxcomp.ops.FEATURE_DEPTH`): madmom's beat and downbeat RNNs read ``[T, F]``
    with F free, and a 1 there makes the original fail on generated inputs. Also the free spatial
    axes of an input a Conv reads, directly or behind a Transpose (an NHWC image):
    :data:`SPATIAL_SIZE`; ``(size, conv, "spatial")``."""
    found: dict[str, dict[int, tuple[int, str]]] = {}
    for value in model.graph.inputs:
        shape = value.shape
        if shape is None or len(shape) == 0:
            continue
        spatial = _spatial_read(value, len(shape))
        if spatial:
            found[value.name] = spatial
        if isinstance(shape[-1], int):
            continue
        hit = _depth_read(value, len(shape), model)
        if hit is not None:
            found.setdefault(value.name, {})[len(shape) - 1] = hit
    return found


#: The size generated inputs give a free spatial axis of an image (or signal) that a Conv reads
#: directly, at least the Conv's kernel extent there: a 1 made NudeNet's YOLOv8 fail on its Concat of
#: upsampled and skip features (1 vs 2) and MTCNN's P-Net on its 12x12 receptive field, so that the
#: check without data said "not checked" and bench without --shape failed; 64 passes five stride-2
#: stages, and keeps the sanity check and bench cheap.
SPATIAL_SIZE = 64


def _spatial_read(value: ir.Value, rank: int) -> dict[int, tuple[int, str]]:
    """Free spatial axes of an input that a Conv reads as its data input: axis -> (:data:`SPATIAL_SIZE`,
    or the kernel's extent when larger; the Conv). Axes 2 and on of ``[N, C, *spatial]``, or, behind
    a Transpose (an NHWC input, as TensorFlow exports and MTCNN's P-Net have it), the input axes that
    the permutation sends there."""
    shape = value.shape
    return {axis: read for axis, read in _conv_axes(value, rank).items() if not isinstance(shape[axis], int)}


def _conv_axes(value: ir.Value, rank: int, hops: int = 0) -> dict[int, tuple[int, str, str]]:
    """Every axis of ``value`` that is a spatial axis of a Conv's data input, directly or through
    Transposes (at most 2): axis -> (size to give it, the Conv, "spatial")."""
    from onnxcomp.ops import is_conv_node, is_transpose_node

    if rank < 3:
        return {}
    for node in value.consumers():
        if not node.inputs or node.inputs[0] is not value:
            continue
        if is_transpose_node(node) and hops < 2:
            perm = node.attributes.get_ints("perm", None)
            perm = list(perm) if perm is not None else list(range(rank))[::-1]
            if sorted(perm) != list(range(rank)):
                continue
            # output axis j is input axis perm[j]
            found = {perm[j]: read for j, read in _conv_axes(node.outputs[0], rank, hops + 1).items()}
            if found:
                return found
            continue
        if not is_conv_node(node):
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        kernel = list(weight.shape)[2:] if weight is not None and weight.shape is not None else []
        dilations = node.attributes.get_ints("dilations", None) or [1] * len(kernel)
        extent = [(int(k) - 1) * int(d) + 1 if isinstance(k, int) else 1 for k, d in zip(kernel, dilations)]
        return {axis: (max(SPATIAL_SIZE, extent[axis - 2] if axis - 2 < len(extent) else 1),
                       f"{node.name or node.op_type}", "spatial") for axis in range(2, rank)}
    return {}


def _edit_axes(node: ir.Node) -> list[int] | None:
    axes = node.attributes.get_ints("axes", None)
    if axes is not None:
        return list(axes)
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        return [int(a) for a in node.inputs[1].const_value.numpy().reshape(-1)]
    return None


def _depth_read(value: ir.Value, rank: int, model: ir.Model, hops: int = 0) -> tuple[int, str] | None:
    """The size a weight reading ``value`` (of ``rank``) fixes on its last axis, and the reader."""
    from onnxcomp.ops import FEATURE_DEPTH, axis_edit

    for node in value.consumers():
        if not node.inputs or node.inputs[0] is not value:
            continue
        edit = axis_edit(node)
        if edit is not None:
            axes = _edit_axes(node)
            if not axes or hops >= 4:
                continue
            out_rank = rank + edit * len(axes)
            indexed = out_rank if edit > 0 else rank  # Unsqueeze's axes index its output, Squeeze's its input
            if indexed - 1 in {a % indexed for a in axes}:  # the last axis is added or dropped
                continue
            hit = _depth_read(node.outputs[0], out_rank, model, hops + 1)
        else:
            fact = FEATURE_DEPTH.lookup(node, model)
            size = fact(node) if fact is not None else None
            hit = (size, node.name or node.op_type) if size else None
        if hit is not None:
            return hit
    return None


def describe_free_dims(chosen: Sequence[Mapping[str, Any]]) -> list[str]:
    """One sentence per input whose free dimensions :func:`fill_free_dims` set."""
    by_input: dict[str, list[Mapping[str, Any]]] = {}
    for c in chosen:
        by_input.setdefault(c["input"], []).append(c)
    return [
        f"input {name!r}: free dimension(s) "
        + ", ".join(f"{c['dim']}={c['value']} (axis {c['axis']}"
                    + (f", a spatial axis of {c['reader']!r}" if c.get("role") == "spatial" else
                       f", read by the weight of {c['reader']!r}" if c.get("reader") else "") + ")" for c in dims)
        + f"; --shape {name}=D0xD1x... overrides"
        for name, dims in by_input.items()
    ]


def generated_feeds(
    model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None, *, count: int = 4, seed: int = 0
) -> tuple[list[Feed], list[dict[str, Any]]]:
    """``count`` :func:`synthetic_feed` feeds for ``model`` (seeds ``seed``, ``seed + 1``, ...: the
    inputs of the check, ``bench`` and latency when no data is given), free dimensions without a
    shape in ``shapes`` set to what a weight reads there, 64 (at least the kernel's extent) on a
    Conv's free spatial axes, or 1 (:func:`fill_free_dims`); returns
    the feeds and the records of the dimensions set (:func:`describe_free_dims` says them)."""
    inputs = model_inputs(model)
    filled, free_dims = fill_free_dims(inputs, dict(shapes or {}), fixed=weight_fixed_dims(model))
    return [synthetic_feed(inputs, filled, seed=seed + i) for i in range(count)], free_dims


#: Input names taken for an attention mask (an encoder's, :mod:`onnxcomp.measure.embedding`):
#: generated as all ones (:func:`synthetic_feed`).
MASK_INPUT_NAMES = ("attention_mask", "input_mask", "mask")


def synthetic_feed(
    inputs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """A feed from the input types: floats uniform in [0, 1), integers 0, booleans False; but an
    integer or boolean input named like an attention mask (:data:`MASK_INPUT_NAMES`) is all ones
    (every position kept: all zeros masks out every position, and a masked softmax over nothing
    returns NaN, as khmersm's did).

    Raises:
        DataError: an input has a dynamic dimension and no ``--shape`` for it (names the dim), a
            ``--shape`` names no input or contradicts a fixed dimension.
    """
    rng = np.random.default_rng(seed)
    known = {s.name for s in inputs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise DataError(f"--shape names {', '.join(map(repr, unknown))}, not an input; inputs: {sorted(known)}")
    feed = {}
    for spec in inputs:
        if spec.optional:
            continue
        if spec.name in shapes:
            shape = shapes[spec.name]
            if spec.shape is not None:
                if len(shape) != len(spec.shape):
                    raise DataError(
                        f"--shape {spec.name}: rank {len(shape)}, the model's input is {spec.describe_shape()}"
                    )
                for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                    if isinstance(want, int) and want != got:
                        raise DataError(
                            f"--shape {spec.name}: axis {axis} is {got}, {spec.fixes(axis)} fixes it at {want}"
                        )
        else:
            if spec.shape is None:
                raise DataError(f"input {spec.name!r} has an unknown shape; give --shape {spec.name}=D0xD1x...")
            for axis, dim in enumerate(spec.shape):
                if not isinstance(dim, int):
                    label = f"{dim!r}" if dim else "?"
                    raise DataError(
                        f"input {spec.name!r} has dynamic dimension {label} (axis {axis}) in "
                        f"{spec.describe_shape()}; give --shape {spec.name}=D0xD1x... or input data"
                    )
            shape = tuple(int(d) for d in spec.shape)  # type: ignore[arg-type]
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.random(shape, dtype=np.float64).astype(spec.dtype)
        elif spec.name.lower() in MASK_INPUT_NAMES:
            feed[spec.name] = np.ones(shape, dtype=spec.dtype)
        else:
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feed
