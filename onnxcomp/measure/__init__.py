"""onnxcomp.measure."""
