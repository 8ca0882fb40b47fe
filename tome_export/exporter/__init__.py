"""Loading models, patching them, and exporting them to ONNX."""
