"""onnxcomp.quant."""
