"""Stochastic depth (Huang et al., 2016; `drop_path` in timm) for transformers' ViT, added at runtime by hooks.

Each `ViTLayer` computes `h = h + dropout(attention.o_proj(...))`, then `h = h + dropout(mlp.fc2(...))`. A forward
hook on `o_proj` and on `fc2` multiplies that branch output, per sample, by a Bernoulli(1 - p) mask / (1 - p) in
training mode, so a dropped sample skips the branch and keeps its residual stream unchanged. Dropout is elementwise,
so scaling before it is the same as scaling after it. Hooks are no part of the weights or the config: a saved model
is a plain ViTForImageClassification.
"""

import functools

import torch
from transformers.models.vit.modeling_vit import ViTLayer

# Set on a model that has the hooks, so that a second call cannot stack a second set.
_MARK = "_vit_hf_drop_path"


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The drop probability of each of DEPTH blocks: rate * l / (depth - 1) for l = 0..depth-1, as timm's
    `torch.linspace(0, rate, depth)`, so the first block is never dropped and the last is dropped at RATE."""
    return [rate * layer / max(depth - 1, 1) for layer in range(depth)]


def _drop_branch(module: torch.nn.Module, inputs: tuple, output: torch.Tensor, keep: float) -> torch.Tensor:
    """Forward hook: OUTPUT with each sample's branch kept with probability KEEP (then scaled by 1 / KEEP)."""
    if not module.training:
        return output
    # Drawn on the output's device from its global RNG, which checkpoints save and gradient checkpointing
    # restores for the recomputation; `bernoulli_` with a Python float needs no host synchronisation.
    shape = (output.shape[0],) + (1,) * (output.ndim - 1)
    mask = torch.empty(shape, dtype=output.dtype, device=output.device).bernoulli_(keep)
    return output * mask.div_(keep)


def add_stochastic_depth(model: torch.nn.Module, rate: float) -> None:
    """Drop the attention and MLP branches of MODEL's ViT layers with probabilities rising linearly to RATE.

    Blocks whose probability is 0 get no hook (so rate 0 leaves the model and its random draws untouched). Refuses
    a model that already has it, a model without ViT layers and a rate outside [0, 1).
    """
    if hasattr(model, _MARK):
        raise RuntimeError("stochastic depth was already added to this model")
    if not 0 <= rate < 1:
        raise ValueError(f"drop_path rate must be in [0, 1), got {rate}")
    layers = [module for module in model.modules() if isinstance(module, ViTLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ViTLayer to add stochastic depth to")
    for layer, probability in zip(layers, drop_path_rates(rate, len(layers)), strict=True):
        if probability > 0:
            hook = functools.partial(_drop_branch, keep=1 - probability)
            layer.attention.o_proj.register_forward_hook(hook)
            layer.mlp.fc2.register_forward_hook(hook)
    setattr(model, _MARK, rate)
