"""Models: the Flax NNX U-Net."""
