"""Piped output: no progress bar remains (a transient bar off a terminal left blank lines)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_piped_output_starts_with_text_not_blank_lines(tmp_path):
    out = tmp_path / "q.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxcomp", "quantize", str(ROOT / "models" / "digits_cnn.onnx"),
                          "-o", str(out), "--calibration", str(ROOT / "models" / "digits_calib.npz"),
                          "--no-latency"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines and lines[0].strip(), run.stdout[:200]
    assert all(line.strip() for line in lines[:3]), run.stdout[:300]  # no blank lines where the bars were
    assert "digits_cnn.onnx ->" in run.stdout
