"""A bug in onnxcomp reaches the user as one line and status 1, not a traceback."""

from __future__ import annotations

import pytest
from conftest import MODELS, replace_inspect_run

from onnxcomp import cli


def _broken(args):
    raise TypeError("fallback() got an unexpected keyword argument 'x'\nsecond line")


def test_internal_error_is_one_line_and_status_1(monkeypatch, capsys):
    replace_inspect_run(monkeypatch, _broken)
    monkeypatch.delenv("ONNXCOMP_DEBUG", raising=False)
    assert cli.main(["inspect", str(MODELS / "digits_cnn.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("onnxcomp: internal error: TypeError: fallback() got an unexpected keyword argument 'x'; "
                          "no output written. This is a bug in onnxcomp")
    assert "ONNXCOMP_DEBUG=1" in err


def test_debug_shows_the_traceback(monkeypatch):
    replace_inspect_run(monkeypatch, _broken)
    monkeypatch.setenv("ONNXCOMP_DEBUG", "1")
    with pytest.raises(TypeError, match="unexpected keyword"):
        cli.main(["inspect", str(MODELS / "digits_cnn.onnx")])
