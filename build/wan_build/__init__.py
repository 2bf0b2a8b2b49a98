"""Build tools: make a tiny checkpoint, export components to ONNX, render a Triton model repository."""
