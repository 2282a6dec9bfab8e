"""The model a recipe asks for: an official checkpoint, a transformers folder or Hub id, or a ViT from scratch."""

import logging
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification
from transformers.models.vit.modeling_vit import ViTAttention

from vit_hf.models.conversion import (
    OFFICIAL_GELU,
    OFFICIAL_LAYER_NORM_EPS,
    label_maps,
    load_npz,
    resize_position_embeddings,
)
from vit_hf.models.download import CATALOG, is_url
from vit_hf.utils.errors import UserError

logger = logging.getLogger(__name__)

# ViT-B/16 (the paper's base model), the starting point of `model.config` for a model trained from scratch.
VIT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def is_official_checkpoint(source: str) -> bool:
    return source in CATALOG or is_url(source) or source.endswith(".npz")


def build_model(model: dict, class_names: list[str]) -> ViTForImageClassification:
    """A ViTForImageClassification for the recipe's `model` section with a head for CLASS_NAMES."""
    labels = label_maps(class_names)
    dropout = {"hidden_dropout_prob": float(model["dropout"])}
    source, image_size = model["pretrained"], model["image_size"]
    if source is not None:  # beside a checkpoint, the recipe lets model.config set dropout rates only
        dropout |= model["config"]
    if source is None:
        fields = {**VIT_BASE, "hidden_act": OFFICIAL_GELU, "layer_norm_eps": OFFICIAL_LAYER_NORM_EPS}
        fields |= model["config"] | dropout | labels
        try:
            config = ViTConfig(image_size=image_size, num_labels=len(class_names), **fields)
        except (TypeError, ValueError) as error:
            raise UserError(f"model.config: not a valid ViTConfig ({error})") from None
        if image_size % config.patch_size or config.hidden_size % config.num_attention_heads:
            raise UserError("model.config: image_size must divide by patch_size and hidden_size by the heads")
        return ViTForImageClassification(config)
    if is_official_checkpoint(source):
        converted, _ = load_npz(
            source, image_size=image_size, labels=class_names, config_overrides=dropout, size_field="model.image_size"
        )
        return converted
    return _from_transformers(source, image_size, class_names, labels | dropout)


def _from_transformers(source: str, image_size: int, class_names: list[str], overrides: dict):
    """A save_pretrained folder or Hub id; a new zero head when the classes differ, the grid resized if needed."""
    try:
        model = ViTForImageClassification.from_pretrained(source)
    except OSError as error:
        where = "folder" if Path(source).exists() else "Hub model id"
        raise UserError(
            f"model.pretrained: could not load the {where} {source!r} ({str(error).splitlines()[0]}); "
            "offline, point it at a local .npz or save_pretrained folder"
        ) from None
    config = model.config
    if [config.id2label.get(i) for i in range(config.num_labels)] != list(class_names):
        logger.info(
            "new zero-initialised head for %d classes (the checkpoint had %d)", len(class_names), config.num_labels
        )
        model.classifier = torch.nn.Linear(config.hidden_size, len(class_names))
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
        config.num_labels = len(class_names)
    if image_size != config.image_size:
        if image_size % config.patch_size:
            raise UserError(f"model.image_size: {image_size} is not divisible by the patch size {config.patch_size}")
        embeddings = model.vit.embeddings
        resized = resize_position_embeddings(embeddings.position_embeddings.data, image_size // config.patch_size)
        embeddings.position_embeddings = torch.nn.Parameter(resized)
        embeddings.image_size = embeddings.patch_embeddings.image_size = (image_size, image_size)
        config.image_size = image_size
    config.update(overrides)
    for module in model.modules():  # the modules were built from the loaded config: give them the new rates
        if isinstance(module, torch.nn.Dropout):
            module.p = config.hidden_dropout_prob
        if isinstance(module, ViTAttention):
            module.attention_dropout = config.attention_probs_dropout_prob
    return model
