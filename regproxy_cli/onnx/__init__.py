"""Exported ONNX files: run one as a model (runtime), write, check and quantize one (export)."""
