"""Inference: the Analyzer (predict), Grad-CAM (explain) and the torch-free ONNX backend."""
