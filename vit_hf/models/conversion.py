"""Official ViT `.npz` checkpoints <-> transformers' `ViTForImageClassification`, exactly (`python -m vit_hf.convert`).

The architecture is read from the tensors' shapes. Two facts of the official Flax model are carried in the
saved config so that `from_pretrained` gives the official numbers: LayerNorm epsilon 1e-6 and the tanh
approximation of GELU (`jax.nn.gelu`'s default).
"""

import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from vit_hf.models.download import resolve_checkpoint
from vit_hf.utils.errors import UserError
from vit_hf.utils.files import atomic_file

logger = logging.getLogger(__name__)

# Prefixes under which released files store the parameters (older files kept the optimizer's target).
KEY_PREFIXES = ("opt/target/", "params/")
OFFICIAL_LAYER_NORM_EPS = 1e-6
OFFICIAL_GELU = "gelu_pytorch_tanh"

_BLOCK = "Transformer/encoderblock_{i}/"
_ATTENTION = "MultiHeadDotProductAttention_1/"


@dataclass
class ConversionReport:
    """Where every tensor went: file keys mapped to model keys, file keys dropped, model keys initialised."""

    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    initialised: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Reading and checking the file


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an official checkpoint, with the release prefixes stripped."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    # numpy would take any other file for a pickle and advise allow_pickle: never load one (it can run code).
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: not a readable .npz checkpoint (not a zip archive, as an .npz is); a broken download?"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            params = {key: npz[key] for key in npz.files}
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise UserError(f"{path}: not a readable .npz checkpoint ({error})") from None
        raise UserError(f"{path}: holds a pickled (object) array, which is never loaded; a checkpoint holds plain "
                        "arrays") from None  # fmt: skip
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise UserError(f"{path}: not a readable .npz checkpoint ({error}); a broken download?") from None
    if not params:
        raise UserError(f"{path}: the .npz holds no arrays")
    for prefix in KEY_PREFIXES:
        if all(key.startswith(prefix) for key in params):
            params = {key[len(prefix) :]: value for key, value in params.items()}
    return params


def _refuse_unsupported(params: dict[str, np.ndarray], path: str) -> None:
    if any(re.search(r"(^|/)(conv_root|gn_root|block\d+/unit\d+)/", key) for key in params):
        raise UserError(
            f"{path}: a hybrid R50+ViT checkpoint; transformers 5 has no ViTHybrid class, so it cannot be converted"
        )
    if "embedding/kernel" not in params or "Transformer/posembed_input/pos_embedding" not in params:
        raise UserError(f"{path}: not an official ViT checkpoint (no embedding/kernel or pos_embedding)")
    if "cls" not in params:
        raise UserError(
            f"{path}: a 'gap' (global average pooling) classifier checkpoint; "
            "ViTForImageClassification classifies from the class token, so it cannot be converted"
        )


def _get(params: dict[str, np.ndarray], key: str, shape: tuple[int, ...], path: str) -> np.ndarray:
    if key not in params:
        raise UserError(f"{path}: missing tensor {key}")
    value = params[key]
    if tuple(value.shape) != tuple(shape):
        raise UserError(f"{path}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value.astype(np.float32)


def infer_config(params: dict[str, np.ndarray], path: str = "checkpoint") -> tuple[ViTConfig, int | None]:
    """The ViTConfig the tensors' shapes imply, and the size of the pre_logits layer (None if absent)."""
    _refuse_unsupported(params, path)
    patch, patch_w, channels, hidden = params["embedding/kernel"].shape
    tokens = params["Transformer/posembed_input/pos_embedding"].shape[1]
    grid = round((tokens - 1) ** 0.5)
    if patch != patch_w or grid * grid != tokens - 1:
        raise UserError(f"{path}: only square patches and square position grids are supported")
    layers = len({m.group(1) for key in params if (m := re.match(r"Transformer/encoderblock_(\d+)/", key))})
    if layers == 0:
        raise UserError(f"{path}: no Transformer/encoderblock_N tensors")
    query = params.get(_BLOCK.format(i=0) + _ATTENTION + "query/kernel")
    mlp = params.get(_BLOCK.format(i=0) + "MlpBlock_3/Dense_0/kernel")
    if query is None or query.ndim != 3 or mlp is None or mlp.ndim != 2:
        raise UserError(f"{path}: encoderblock_0 lacks attention query/kernel [hidden, heads, head_dim] or MLP Dense_0")
    representation = params["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in params else None
    head = params.get("head/kernel")
    config = ViTConfig(
        hidden_size=int(hidden),
        num_hidden_layers=layers,
        num_attention_heads=int(query.shape[1]),
        intermediate_size=int(mlp.shape[1]),
        image_size=int(grid * patch),
        patch_size=int(patch),
        num_channels=int(channels),
        num_labels=int(head.shape[1]) if head is not None else 2,
        hidden_act=OFFICIAL_GELU,
        layer_norm_eps=OFFICIAL_LAYER_NORM_EPS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
    )
    return config, representation


# ----------------------------------------------------------------------------------------------------------
# Position embeddings


def resize_position_embeddings(posemb: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resample the patch grid of a (1, 1 + g*g, D) embedding to new_grid, keeping the class token.

    The official `interpolate_posembed` uses `scipy.ndimage.zoom(order=1)`, which maps output pixel i to input
    coordinate i * (g - 1) / (n - 1): that is bilinear interpolation with aligned corners.
    """
    cls, grid = posemb[:, :1], posemb[:, 1:]
    old = round(grid.shape[1] ** 0.5)
    if old == new_grid:
        return posemb
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).double()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(posemb.dtype)
    return torch.cat([cls, grid], dim=1)


# ----------------------------------------------------------------------------------------------------------
# npz -> transformers


def _linear(kernel: np.ndarray) -> torch.Tensor:
    """Flax Dense kernel [in, out] -> torch Linear weight [out, in]."""
    return torch.from_numpy(np.ascontiguousarray(kernel.T))


def npz_to_state_dict(
    params: dict[str, np.ndarray], config: ViTConfig, keep_head: bool, path: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map every tensor of the file onto the model's keys (asserting shapes) and say what was dropped."""
    report = ConversionReport()
    state: dict[str, torch.Tensor] = {}
    d, heads, mlp = config.hidden_size, config.num_attention_heads, config.intermediate_size
    head_dim, p, c = d // heads, config.patch_size, config.num_channels
    tokens = 1 + (config.image_size // p) ** 2

    def put(model_key: str, file_key: str, shape: tuple[int, ...], to_torch) -> None:
        state[model_key] = to_torch(_get(params, file_key, shape, path))
        report.mapped[file_key] = model_key

    put(
        "vit.embeddings.patch_embeddings.projection.weight",
        "embedding/kernel",
        (p, p, c, d),
        lambda k: torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))),
    )
    put("vit.embeddings.patch_embeddings.projection.bias", "embedding/bias", (d,), torch.from_numpy)
    put("vit.embeddings.cls_token", "cls", (1, 1, d), torch.from_numpy)
    put(
        "vit.embeddings.position_embeddings",
        "Transformer/posembed_input/pos_embedding",
        (1, tokens, d),
        torch.from_numpy,
    )
    for i in range(config.num_hidden_layers):
        src, dst = _BLOCK.format(i=i), f"vit.layers.{i}."
        for norm, name in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
            put(dst + f"{name}.weight", src + f"{norm}/scale", (d,), torch.from_numpy)
            put(dst + f"{name}.bias", src + f"{norm}/bias", (d,), torch.from_numpy)
        for flax, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            put(
                dst + f"attention.{proj}.weight",
                src + _ATTENTION + f"{flax}/kernel",
                (d, heads, head_dim),
                lambda k: _linear(k.reshape(d, d)),
            )
            put(
                dst + f"attention.{proj}.bias",
                src + _ATTENTION + f"{flax}/bias",
                (heads, head_dim),
                lambda b: torch.from_numpy(b.reshape(d)),
            )
        put(
            dst + "attention.o_proj.weight",
            src + _ATTENTION + "out/kernel",
            (heads, head_dim, d),
            lambda k: _linear(k.reshape(d, d)),
        )
        put(dst + "attention.o_proj.bias", src + _ATTENTION + "out/bias", (d,), torch.from_numpy)
        for dense, fc, shape in (("Dense_0", "fc1", (d, mlp)), ("Dense_1", "fc2", (mlp, d))):
            put(dst + f"mlp.{fc}.weight", src + f"MlpBlock_3/{dense}/kernel", shape, _linear)
            put(dst + f"mlp.{fc}.bias", src + f"MlpBlock_3/{dense}/bias", (shape[1],), torch.from_numpy)
    put("vit.layernorm.weight", "Transformer/encoder_norm/scale", (d,), torch.from_numpy)
    put("vit.layernorm.bias", "Transformer/encoder_norm/bias", (d,), torch.from_numpy)

    has_pre_logits = any(key.startswith("pre_logits/") for key in params)
    if keep_head:
        if has_pre_logits:
            raise UserError(
                f"{path}: has a pre_logits (representation) layer, which ViTForImageClassification has no place "
                "for; --keep-head works only on files without one (the ImageNet fine-tuned files)"
            )
        put("classifier.weight", "head/kernel", (d, config.num_labels), _linear)
        put("classifier.bias", "head/bias", (config.num_labels,), torch.from_numpy)
    else:
        for key in params:
            if key.startswith("pre_logits/"):
                report.dropped[key] = "pre_logits is discarded for fine-tuning, as in the official loader"
            elif key.startswith("head/"):
                report.dropped[key] = "pre-training head replaced by a new zero-initialised head"
        state["classifier.weight"] = torch.zeros(config.num_labels, d)
        state["classifier.bias"] = torch.zeros(config.num_labels)
        report.initialised["classifier.weight"] = "zeros, as the official fine-tuning head"
        report.initialised["classifier.bias"] = "zeros, as the official fine-tuning head"

    unused = sorted(set(params) - set(report.mapped) - set(report.dropped))
    if unused:
        raise UserError(f"{path}: {len(unused)} tensors not part of a ViT checkpoint, e.g. {unused[0]}")
    return state, report


def label_maps(labels: list[str]) -> dict:
    """The config's id2label and label2id for class names in head order."""
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


def load_npz(
    source: str | os.PathLike,
    image_size: int | None = None,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    keep_head: bool = False,
    config_overrides: dict | None = None,
    size_field: str = "--image-size",
) -> tuple[ViTForImageClassification, ConversionReport]:
    """A ViTForImageClassification from an official checkpoint (path, URL or catalog name).

    With keep_head the file's head and classes are kept; otherwise pre_logits and the head are dropped and a new
    zero-initialised head for `labels` (or `num_labels`) is attached, as the official fine-tuning loader does.
    `image_size` resamples the position embeddings once, here. `config_overrides` sets other ViTConfig fields
    (dropout, say). SIZE_FIELD names where the image size came from in an error (a flag, a recipe field).
    """
    path = str(resolve_checkpoint(source))
    params = read_npz(path)
    config, _ = infer_config(params, path)
    if not keep_head:
        if labels is None and num_labels is None:
            raise UserError("give the new head's classes (labels or num_labels), or keep the file's head")
        config.num_labels = len(labels) if labels is not None else int(num_labels)
        if labels is not None:
            config.update(label_maps(list(labels)))
    elif labels is not None or num_labels is not None:
        raise UserError("keep_head keeps the file's classes: do not also give labels or num_labels")
    state, report = npz_to_state_dict(params, config, keep_head, path)

    if image_size is not None and image_size != config.image_size:
        if image_size % config.patch_size:
            raise UserError(f"{size_field}: {image_size} is not divisible by the patch size {config.patch_size}")
        key = "vit.embeddings.position_embeddings"
        state[key] = resize_position_embeddings(state[key], image_size // config.patch_size)
        config.image_size = image_size
    for name, value in (config_overrides or {}).items():
        setattr(config, name, value)

    model = ViTForImageClassification(config)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AssertionError(f"conversion does not cover the model: missing {missing}, extra {extra}")
    model.load_state_dict(state, strict=True)
    for key, reason in report.dropped.items():
        logger.info("dropped %s: %s", key, reason)
    return model.eval(), report


# ----------------------------------------------------------------------------------------------------------
# transformers -> npz


def model_to_npz_params(model: ViTForImageClassification) -> dict[str, np.ndarray]:
    """The official-layout arrays of a ViTForImageClassification (the inverse of npz_to_state_dict)."""
    config = model.config
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = d // heads
    sd = {key: value.detach().float().cpu().numpy() for key, value in model.state_dict().items()}
    out = {
        "embedding/kernel": sd["vit.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "cls": sd["vit.embeddings.cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["vit.embeddings.position_embeddings"],
        "Transformer/encoder_norm/scale": sd["vit.layernorm.weight"],
        "Transformer/encoder_norm/bias": sd["vit.layernorm.bias"],
        "head/kernel": sd["classifier.weight"].T,
        "head/bias": sd["classifier.bias"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"vit.layers.{i}.", _BLOCK.format(i=i)
        for norm, name in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
            out[dst + f"{norm}/scale"] = sd[src + f"{name}.weight"]
            out[dst + f"{norm}/bias"] = sd[src + f"{name}.bias"]
        for flax, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[dst + _ATTENTION + f"{flax}/kernel"] = sd[src + f"attention.{proj}.weight"].T.reshape(
                d, heads, head_dim
            )
            out[dst + _ATTENTION + f"{flax}/bias"] = sd[src + f"attention.{proj}.bias"].reshape(heads, head_dim)
        out[dst + _ATTENTION + "out/kernel"] = sd[src + "attention.o_proj.weight"].T.reshape(heads, head_dim, d)
        out[dst + _ATTENTION + "out/bias"] = sd[src + "attention.o_proj.bias"]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[dst + f"MlpBlock_3/{dense}/kernel"] = sd[src + f"mlp.{fc}.weight"].T
            out[dst + f"MlpBlock_3/{dense}/bias"] = sd[src + f"mlp.{fc}.bias"]
    return {key: np.ascontiguousarray(value) for key, value in out.items()}


def save_npz(model: ViTForImageClassification, path: str | os.PathLike) -> Path:
    """Write MODEL as an official-layout `.npz` (written beside, then renamed: never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as staging, open(staging, "wb") as file:
        np.savez(file, **model_to_npz_params(model))
    return path
