"""Inference: the test protocol (whole, sliding window, TTA), the runtime (precision, compile) and the predictor."""
