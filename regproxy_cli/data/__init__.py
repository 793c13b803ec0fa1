"""Data: datasets (ADE20K, Cityscapes, Pascal Context, user folders, synthetic scenes), opening them, and the mmseg
training pipeline."""
