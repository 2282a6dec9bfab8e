"""The optimizer and the learning-rate schedule of a recipe, as the official `vit_jax` training sets them up."""

import functools
import math
import re

import torch

# Parameters that take no weight decay, by the end of their name: every bias and LayerNorm weight (ndim 1) and the
# two embeddings that are not kernels.
NO_DECAY_SUFFIXES = ("position_embeddings", "cls_token")


def layer_id(name: str, num_layers: int) -> int:
    """A parameter's depth for layer-wise decay: 0 the embeddings, 1..L the transformer layers, L + 1 the rest
    (final norm and head), as BEiT and MAE number them."""
    if "embeddings" in name:
        return 0
    found = re.search(r"\.layers?\.(\d+)\.", name)
    return int(found.group(1)) + 1 if found else num_layers + 1


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, base_lr: float, layer_decay: float | None = None
) -> list[dict]:
    """The trainable parameters in groups: kernels with WEIGHT_DECAY, biases, norms and embeddings without; with
    LAYER_DECAY, also by depth, a group at depth d having the learning rate base_lr * layer_decay ** (L + 1 - d)."""
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)
        depth = layer_id(name, num_layers) if layer_decay is not None else num_layers + 1
        scale = layer_decay ** (num_layers + 1 - depth) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (depth, exempt), {"params": [], "weight_decay": 0.0 if exempt else weight_decay, "lr": base_lr * scale}
        )
        group["params"].append(param)
    # Kernels first, then the exempt: without layer decay, the two groups of the official recipe in that order.
    return [groups[key] for key in sorted(groups, key=lambda key: (key[1], key[0]))]


class BFloat16MomentumSGD(torch.optim.Optimizer):
    """SGD whose momentum buffers are stored in bfloat16, with the arithmetic of the official jitted training step.

    `vit_jax` trains with `optax.sgd(..., accumulator_dtype='bfloat16')` under `jax.jit`, which computes, per step:

        d     = grad + weight_decay * param                  (torch.optim.SGD's weight decay; optax has none)
        new   = d + float32(bf16(momentum)) * buffer          in float32: XLA keeps the product's excess precision
        step  = d + momentum * new  if nesterov else new     float32: the update uses the unrounded trace
        param = param + (-lr) * step
        buffer = bf16(new)                                    rounded only for storage

    The momentum itself is rounded to bfloat16 once (0.9 -> 0.8984375), as JAX casts a Python float that multiplies
    a bfloat16 array; the product of that and a bfloat16 buffer is exact in float32. (optax run op by op, without
    `jit`, would round the product to bfloat16 too: that is not the official step.)

    The step overwrites the gradients, its scratch space (the loop frees them right after): a float32 temporary the
    size of the model would cost more memory than the bfloat16 momentum saves.
    """

    def __init__(self, params, lr: float, momentum: float, nesterov: bool) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=torch.bfloat16)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                torch._foreach_add_(grads, params, alpha=group["weight_decay"])
            momentum = torch.tensor(group["momentum"], dtype=torch.bfloat16).item()  # bf16(momentum), exactly
            if group["nesterov"]:  # needs the gradient and the new trace at once: one temporary
                traces = torch._foreach_add(grads, buffers, alpha=momentum)  # float32, the product exact
                torch._foreach_copy_(buffers, traces)  # stored rounded to nearest even, as a JAX cast
                torch._foreach_mul_(traces, group["momentum"])
                torch._foreach_add_(grads, traces)
            else:
                torch._foreach_add_(grads, buffers, alpha=momentum)
                torch._foreach_copy_(buffers, grads)
            torch._foreach_mul_(grads, -group["lr"])
            torch._foreach_add_(params, grads)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, then store the buffers in bfloat16 again: torch casts every state tensor to its parameter's dtype."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            state["momentum_buffer"] = state["momentum_buffer"].to(torch.bfloat16)


def make_optimizer(model: torch.nn.Module, optim: dict) -> torch.optim.Optimizer:
    """SGD with momentum (the official recipe) or AdamW; no weight decay on biases, norms and embeddings.

    SGD keeps its momentum in `optim.momentum_dtype`: float32 is torch.optim.SGD itself, bfloat16 the official default.
    """
    groups = parameter_groups(model, optim["weight_decay"], optim["lr"], optim["layer_decay"])
    fused = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
    sgd = {"lr": optim["lr"], "momentum": optim["momentum"], "nesterov": optim["nesterov"]}
    if optim["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), **fused)
    if optim["momentum_dtype"] == "float32":
        return torch.optim.SGD(groups, **sgd, **fused)
    return BFloat16MomentumSGD(groups, **sgd)


def vit_jax_lr_factor(step: int, schedule: dict, base_lr: float) -> float:
    """The learning rate at STEP over BASE_LR, as `vit_jax.utils.create_learning_rate_schedule`.

    lr = base * (1 + cos(pi * progress)) / 2              cosine
    lr = end + (base - end) * (1 - progress)              linear, end = schedule.linear_end (an absolute rate)
    then lr *= min(1, step / warmup) when there is a warmup, with progress = (step - warmup) / (total - warmup) in
    [0, 1]: the warmup also scales linear_end, so the rate starts from 0.
    """
    warmup, total = schedule["warmup_steps"], schedule["total_steps"]
    progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    if schedule["name"] == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        end = schedule["linear_end"] / base_lr
        factor = end + (1.0 - end) * (1.0 - progress)
    return factor * min(1.0, step / warmup) if warmup else factor


def make_schedule(optimizer: torch.optim.Optimizer, schedule: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then cosine decay to 0 or linear decay to `linear_end` at `total_steps`.

    Every parameter group follows the same factor of its own rate, that of the head (the recipe's `optim.lr`), so
    with layer decay a group at scale s ends the linear decay at s * linear_end: none of them rises to it.
    """
    head = max(group.get("initial_lr", group["lr"]) for group in optimizer.param_groups)
    factor = functools.partial(vit_jax_lr_factor, schedule=schedule, base_lr=head)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def head_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The head's learning rate now, the recipe's `optim.lr` times the schedule: the largest of the groups' rates
    (layer decay only lowers the rates below the head; group 0 is the embeddings)."""
    return max(scheduler.get_last_lr())
