"""The inference service: the registry's champion ONNX model behind an HTTP API."""
