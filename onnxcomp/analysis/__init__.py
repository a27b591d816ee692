"""onnxcomp.analysis."""
