"""vit-hf: Google's original ViT checkpoints, fine-tuned with the Hugging Face stack."""

__version__ = "0.1.0"
