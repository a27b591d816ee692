"""onnxcomp benchmark suite: onnxcomp's recipes against onnxruntime.quantization on real models.

Run ``python -m benchmarks`` (or ``python benchmarks/run.py``); ``--help`` lists the options.
See ``benchmarks/run.py`` for what is measured and ``benchmarks/suite.py`` for the models.
"""
