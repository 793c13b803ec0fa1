"""Models in and out: the model directory format, the Hugging Face Hub, the zoo, the authors' checkpoints, ONNX."""
