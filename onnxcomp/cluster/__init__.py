"""onnxcomp.cluster."""
