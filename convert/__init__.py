"""PyTorch → ONNX conversion with a parity proof, writing into a model repository."""
