"""Export: ONNX graphs of bundles and their int8 quantization."""
