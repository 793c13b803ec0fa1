"""Models in and out of the Hugging Face Hub: the model directory format, the zoo, the authors' checkpoints."""
