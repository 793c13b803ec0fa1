"""Training, evaluation and running a model over files: the YAML config, the training loop, evaluation and its
metrics, and predict's runner (files, videos)."""
