"""Exceptions raised by onnxcomp.

Every error a user can cause (a bad file, bad data, a bad option) is an :class:`OnnxcompError`
whose message names the file, node, tensor or option at fault and says what is wrong. The CLI
prints the message and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class OnnxcompError(Exception):
    """Base class for user-facing errors."""


class ModelLoadError(OnnxcompError):
    """The model cannot be read: missing, not ONNX, truncated, too new, or invalid."""


class ModelSaveError(OnnxcompError):
    """The model cannot be written where asked (same as the input, folder not writable...)."""


class RefusedOutputError(OnnxcompError):
    """onnxruntime refuses (cannot load or run) a model onnxcomp wrote: a bug in onnxcomp, reported
    as an error (exit 1) with the refused model kept aside for a bug report, never at the output."""


class DataError(OnnxcompError):
    """Calibration or evaluation data does not fit the model (names, dtypes, shapes, values)."""


class ConfigError(OnnxcompError):
    """A configuration value (pass config, recipe entry, CLI flag) is invalid."""


class OpsetError(OnnxcompError):
    """The model's opset is outside what a pass supports and upgrading was not allowed."""
