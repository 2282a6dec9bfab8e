"""The data's way to the model: sources and splits, the loaders, photo decoding, streaming, augmentations."""
