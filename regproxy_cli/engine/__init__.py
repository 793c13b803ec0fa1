"""Training and evaluation: the YAML config, the training loop, evaluation and its metrics."""
