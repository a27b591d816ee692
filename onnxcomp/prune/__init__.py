"""onnxcomp.prune."""
