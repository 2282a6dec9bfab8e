"""Serving a model folder: a backend per folder kind (PyTorch or ONNX Runtime), batched classification of image
files, the verified ONNX export and the demo page."""
