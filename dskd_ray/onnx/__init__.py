"""ONNX: the exported scoring graph and the ONNX Runtime backend that scores with it."""
