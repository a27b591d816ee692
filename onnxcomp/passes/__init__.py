"""onnxcomp.passes."""
