"""The models: the official checkpoint catalog and download, conversion, a recipe's model, drop path, LoRA."""
