"""Backends: how a built model is exported and run.

``onnx_export`` writes ``model.onnx`` (and ``model.pt2``); the runners execute a build:
``onnxruntime_runner`` (the CPU fallback), ``torch_runner`` (eager torch), ``torch_cuda_runner``
(2:4 semi-structured sparse tensors on a GPU) and ``tensorrt_runner`` (an engine; TensorRT is
imported lazily and is not installed on machines without a GPU). ``base`` is their common contract.
"""
