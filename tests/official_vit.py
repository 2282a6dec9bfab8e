"""An independent NumPy reading of the official Flax ViT (vit_jax/models_vit.py), for tests only.

`write_checkpoint` writes random parameters in the layout of the released `.npz` files; `forward` computes the
class-token features straight from those arrays, with no code from vit_hf.
"""

from pathlib import Path

import numpy as np

BLOCK = "Transformer/encoderblock_{i}/"


def random_params(
    layers: int = 1,
    hidden: int = 768,
    heads: int = 12,
    mlp: int = 3072,
    patch: int = 16,
    grid: int = 14,
    representation: int | None = 768,
    classes: int | None = 21843,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random arrays in the official layout (defaults: ViT-B/16 from ImageNet-21k, with pre_logits)."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    params = {
        "embedding/kernel": rand(patch, patch, 3, hidden),
        "embedding/bias": rand(hidden),
        "cls": rand(1, 1, hidden),
        "Transformer/posembed_input/pos_embedding": rand(1, 1 + grid * grid, hidden),
        "Transformer/encoder_norm/scale": 1 + rand(hidden),
        "Transformer/encoder_norm/bias": rand(hidden),
    }
    for i in range(layers):
        b = BLOCK.format(i=i)
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            params[b + f"{norm}/scale"] = 1 + rand(hidden)
            params[b + f"{norm}/bias"] = rand(hidden)
        for name in ("query", "key", "value"):
            params[b + f"MultiHeadDotProductAttention_1/{name}/kernel"] = rand(hidden, heads, head_dim)
            params[b + f"MultiHeadDotProductAttention_1/{name}/bias"] = rand(heads, head_dim)
        params[b + "MultiHeadDotProductAttention_1/out/kernel"] = rand(heads, head_dim, hidden)
        params[b + "MultiHeadDotProductAttention_1/out/bias"] = rand(hidden)
        params[b + "MlpBlock_3/Dense_0/kernel"] = rand(hidden, mlp)
        params[b + "MlpBlock_3/Dense_0/bias"] = rand(mlp)
        params[b + "MlpBlock_3/Dense_1/kernel"] = rand(mlp, hidden)
        params[b + "MlpBlock_3/Dense_1/bias"] = rand(hidden)
    width = hidden
    if representation:
        params["pre_logits/kernel"] = rand(hidden, representation)
        params["pre_logits/bias"] = rand(representation)
        width = representation
    if classes:
        params["head/kernel"] = rand(width, classes)
        params["head/bias"] = rand(classes)
    return params


def write_checkpoint(path: Path, params: dict[str, np.ndarray], prefix: str = "") -> Path:
    np.savez(path, **{prefix + key: value for key, value in params.items()})
    return path


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def forward(params: dict[str, np.ndarray], images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Class-token features after encoder_norm, and logits when the file's head sits on them directly.

    images_nhwc are already scaled to [-1, 1]. Computed in float64.
    """
    p = {key: value.astype(np.float64) for key, value in params.items()}
    patch, _, _, hidden = p["embedding/kernel"].shape
    n, height, width, _ = images_nhwc.shape
    gh, gw = height // patch, width // patch
    patches = images_nhwc.astype(np.float64).reshape(n, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(n, gh * gw, -1) @ p["embedding/kernel"].reshape(-1, hidden) + p["embedding/bias"]
    x = np.concatenate([np.broadcast_to(p["cls"], (n, 1, hidden)), x], axis=1)
    x = x + p["Transformer/posembed_input/pos_embedding"]
    i = 0
    while BLOCK.format(i=i) + "LayerNorm_0/scale" in p:
        b = BLOCK.format(i=i) + "{}"
        att = b.format("MultiHeadDotProductAttention_1/{}")
        y = _layer_norm(x, p[b.format("LayerNorm_0/scale")], p[b.format("LayerNorm_0/bias")])
        q, k, v = (
            np.einsum("ntd,dhk->nhtk", y, p[att.format(f"{name}/kernel")])
            + p[att.format(f"{name}/bias")][None, :, None, :]
            for name in ("query", "key", "value")
        )
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("nhtk,hkd->ntd", weights @ v, p[att.format("out/kernel")]) + p[att.format("out/bias")]
        x = x + out
        y = _layer_norm(x, p[b.format("LayerNorm_2/scale")], p[b.format("LayerNorm_2/bias")])
        y = _gelu_tanh(y @ p[b.format("MlpBlock_3/Dense_0/kernel")] + p[b.format("MlpBlock_3/Dense_0/bias")])
        x = x + y @ p[b.format("MlpBlock_3/Dense_1/kernel")] + p[b.format("MlpBlock_3/Dense_1/bias")]
        i += 1
    x = _layer_norm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
    features = x[:, 0]
    logits = (
        features @ p["head/kernel"] + p["head/bias"] if "head/kernel" in p and "pre_logits/kernel" not in p else None
    )
    return features, logits
