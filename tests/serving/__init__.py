"""The serving tests: ONNX export, backends, predict on photos, the demo page."""
