"""The optimizer and the schedule: vit_jax's formulas and optax's bfloat16 momentum, against references written here."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from vit_hf.recipe import resolve_recipe
from vit_hf.training.optim import head_lr, make_optimizer, make_schedule
from vit_hf.utils.errors import UserError

ONE_LAYER_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 8,
}


def sgd(**optim) -> dict:
    return resolve_recipe({"optim": {"name": "sgd", **optim}})["optim"]


# --- the schedule --------------------------------------------------------------------------------------


def vit_jax_lr(step: int, base: float, decay_type: str, warmup: int, total: int, linear_end: float) -> float:
    """vit_jax.utils.create_learning_rate_schedule, line by line."""
    progress = min(max((step - warmup) / float(total - warmup), 0.0), 1.0)
    if decay_type == "linear":
        lr = linear_end + (base - linear_end) * (1.0 - progress)
    else:
        lr = base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup:
        lr = lr * min(1.0, step / warmup)
    return lr


@pytest.mark.parametrize("warmup", [0, 50])
@pytest.mark.parametrize("name, linear_end", [("cosine", 1e-5), ("linear", 1e-5), ("linear", 0.0), ("linear", 2e-3)])
def test_schedule_is_the_official_formula_of_the_update_count(name, linear_end, warmup):
    base, total = 0.03, 400
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, sgd(lr=base))
    schedule = {"name": name, "warmup_steps": warmup, "total_steps": total, "linear_end": linear_end}
    scheduler = make_schedule(optimizer, resolve_recipe({"schedule": schedule})["schedule"])
    for step in range(total + 1):
        expected = vit_jax_lr(step, base, name, warmup, total, linear_end)
        assert scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_linear_decay_ends_at_linear_end_by_default():
    optimizer = make_optimizer(torch.nn.Linear(2, 2), sgd(lr=0.03))
    schedule = resolve_recipe({"schedule": {"name": "linear", "warmup_steps": 1, "total_steps": 3}})["schedule"]
    scheduler = make_schedule(optimizer, schedule)
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.03, (0.03 + 1e-5) / 2, 1e-5], rel=1e-12)


# --- weight decay --------------------------------------------------------------------------------------

NO_DECAY = [
    "vit.embeddings.cls_token",
    "vit.embeddings.position_embeddings",
    "vit.embeddings.patch_embeddings.projection.bias",
    "vit.layers.0.attention.q_proj.bias",
    "vit.layers.0.attention.k_proj.bias",
    "vit.layers.0.attention.v_proj.bias",
    "vit.layers.0.attention.o_proj.bias",
    "vit.layers.0.layernorm_before.weight",
    "vit.layers.0.layernorm_before.bias",
    "vit.layers.0.layernorm_after.weight",
    "vit.layers.0.layernorm_after.bias",
    "vit.layers.0.mlp.fc1.bias",
    "vit.layers.0.mlp.fc2.bias",
    "vit.layernorm.weight",
    "vit.layernorm.bias",
    "classifier.bias",
]
DECAY = [
    "vit.embeddings.patch_embeddings.projection.weight",
    "vit.layers.0.attention.q_proj.weight",
    "vit.layers.0.attention.k_proj.weight",
    "vit.layers.0.attention.v_proj.weight",
    "vit.layers.0.attention.o_proj.weight",
    "vit.layers.0.mlp.fc1.weight",
    "vit.layers.0.mlp.fc2.weight",
    "classifier.weight",
]


@pytest.mark.parametrize("momentum_dtype", ["float32", "bfloat16"])
def test_sgd_has_no_weight_decay_on_biases_norms_and_embeddings(momentum_dtype):
    model = ViTForImageClassification(ViTConfig(image_size=32, num_labels=3, **ONE_LAYER_VIT))
    optimizer = make_optimizer(model, sgd(weight_decay=0.1, momentum_dtype=momentum_dtype))
    names = {id(param): name for name, param in model.named_parameters()}
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(DECAY)
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(NO_DECAY)


def test_layer_decay_gives_each_depth_base_lr_times_decay_to_its_distance_from_the_head():
    config = ViTConfig(image_size=32, num_labels=3, **(ONE_LAYER_VIT | {"num_hidden_layers": 2}))
    model = ViTForImageClassification(config)
    optimizer = make_optimizer(model, sgd(lr=0.1, weight_decay=0.01, layer_decay=0.5))
    names = {id(param): name for name, param in model.named_parameters()}
    lr = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    weight_decay = {names[id(p)]: group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    # Two layers: the head and final norm at depth 3 (full rate), layer 1 at 2, layer 0 at 1, embeddings at 0.
    expected = {
        "classifier.weight": 0.1,
        "vit.layernorm.weight": 0.1,
        "vit.layers.1.mlp.fc1.weight": 0.05,
        "vit.layers.1.attention.q_proj.bias": 0.05,
        "vit.layers.0.mlp.fc2.weight": 0.025,
        "vit.embeddings.cls_token": 0.0125,
        "vit.embeddings.position_embeddings": 0.0125,
        "vit.embeddings.patch_embeddings.projection.weight": 0.0125,
    }
    for name, value in expected.items():
        assert lr[name] == pytest.approx(value), name
    assert weight_decay["vit.layers.0.mlp.fc2.weight"] == 0.01 and weight_decay["vit.embeddings.cls_token"] == 0.0
    assert len(lr) == len(list(model.parameters()))
    # Composed with the schedule: every group follows the same factor of its own rate.
    schedule = make_schedule(
        optimizer, resolve_recipe({"schedule": {"warmup_steps": 2, "total_steps": 10}})["schedule"]
    )
    schedule.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(
        [group["initial_lr"] * 0.5 for group in optimizer.param_groups]
    )


def test_with_layer_decay_each_linear_decay_ends_at_linear_end_times_its_scale_and_the_head_rate_is_logged():
    config = ViTConfig(image_size=32, num_labels=3, **(ONE_LAYER_VIT | {"num_hidden_layers": 2}))
    optimizer = make_optimizer(ViTForImageClassification(config), sgd(lr=0.1, layer_decay=0.5))
    schedule = {"name": "linear", "warmup_steps": 2, "total_steps": 10, "linear_end": 0.02}
    scheduler = make_schedule(optimizer, resolve_recipe({"schedule": schedule})["schedule"])
    scales = [group["initial_lr"] / 0.1 for group in optimizer.param_groups]
    assert sorted(set(scales)) == pytest.approx([0.125, 0.25, 0.5, 1.0])
    rates, heads = [], []
    for _ in range(10):
        rates.append([group["lr"] for group in optimizer.param_groups])
        heads.append(head_lr(scheduler))
        scheduler.step()
    final = [group["lr"] for group in optimizer.param_groups]
    # vit_jax's linear decay, of the head's rate: from 0.1 down to linear_end, after the warmup from 0.
    assert heads == pytest.approx([0.0, 0.05] + [0.02 + 0.08 * (1 - (s - 2) / 8) for s in range(2, 10)])
    assert final == pytest.approx([0.02 * scale for scale in scales])
    for group in range(len(scales)):  # no group's rate rises after the warmup (a low one used to climb to 0.02)
        after_warmup = [step_rates[group] for step_rates in rates[2:]] + [final[group]]
        assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:], strict=False)), group


def test_a_layer_decay_outside_0_1_is_one_line_naming_the_field():
    with pytest.raises(UserError, match=r"^optim.layer_decay: must be in \(0, 1\] or null, got 1.5$"):
        resolve_recipe({"optim": {"layer_decay": 1.5}})


# --- bfloat16 momentum ---------------------------------------------------------------------------------


class TwoTensors(torch.nn.Module):
    """A kernel (decayed) and a bias (not), of awkward sizes."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.kernel = torch.nn.Parameter(torch.randn(37, 19, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(19, generator=generator))


def gradient_sequence(model: torch.nn.Module, steps: int) -> list[list[torch.Tensor]]:
    """Random gradients whose scale changes over four decades, so the momentum both grows and shrinks."""
    generator = torch.Generator().manual_seed(1)
    scales = torch.logspace(-3, 1, steps)
    return [[torch.randn(p.shape, generator=generator) * scale for p in model.parameters()] for scale in scales]


LRS = [0.03 * (1 - i / 12) for i in range(12)]


def train(model, optimizer, grads, lrs) -> list[list[torch.Tensor]]:
    """The parameters after each update of OPTIMIZER fed GRADS, with the learning rate LRS."""
    history = []
    for step_grads, lr in zip(grads, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for param, grad in zip(model.parameters(), step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def jitted_optax_sgd(params, decays, grads, lrs, nesterov) -> list[list[torch.Tensor]]:
    """The official step itself: `jax.jit` of `optax.sgd(lr, momentum=0.9, accumulator_dtype=bfloat16).update`, and
    `optax.apply_updates`. Weight decay, which optax.sgd has not, is torch.optim.SGD's: `optax.add_decayed_weights`
    chained before it adds it to the gradient first."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    schedule = jnp.asarray(lrs, dtype=jnp.float32)
    sgd = optax.sgd(lambda count: schedule[count], momentum=0.9, nesterov=nesterov, accumulator_dtype=jnp.bfloat16)
    mask = [decay != 0 for decay in decays]
    decay = max(decays)
    optimizer = optax.chain(optax.add_decayed_weights(decay, mask=mask), sgd) if decay else sgd
    params = [jnp.asarray(p.detach().numpy()) for p in params]
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for step_grads in grads:
        params, state = step(params, state, [jnp.asarray(g.numpy()) for g in step_grads])
        history.append([torch.from_numpy(np.asarray(p).copy()) for p in params])
    return history


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_bfloat16_momentum_is_the_jitted_optax_sgd_with_a_bfloat16_accumulator(nesterov, weight_decay):
    model = TwoTensors()
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, sgd(nesterov=nesterov, weight_decay=weight_decay, momentum_dtype="bfloat16"))
    grads = gradient_sequence(model, len(LRS))

    history = train(model, optimizer, grads, LRS)

    expected = jitted_optax_sgd(start, [weight_decay, 0.0], grads, LRS, nesterov=nesterov)
    for step, (got, want) in enumerate(zip(history, expected, strict=True)):
        for g, w in zip(got, want, strict=True):
            # Float32 rounding apart (XLA may fuse a multiply-add), the same numbers: rounding the momentum product
            # to bfloat16, as optax run op by op does, is 1e-3 away by the last steps.
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=f"step {step}")
    for param in model.parameters():
        assert optimizer.state[param]["momentum_buffer"].dtype == torch.bfloat16


def test_bfloat16_momentum_differs_from_float32_momentum():
    """The bfloat16 rounding is really there: the same run in float32 ends elsewhere."""
    ends = []
    for momentum_dtype in ("float32", "bfloat16"):
        model = TwoTensors()
        train(model, make_optimizer(model, sgd(momentum_dtype=momentum_dtype)), gradient_sequence(model, 12), LRS)
        ends.append(model.kernel.detach())
    assert not torch.equal(*ends)
    torch.testing.assert_close(*ends, rtol=0, atol=1e-2)


@pytest.mark.parametrize("nesterov", [False, True])
def test_float32_momentum_is_torch_sgd_exactly(nesterov):
    model = TwoTensors()
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, sgd(nesterov=nesterov, weight_decay=0.01, momentum_dtype="float32"))
    torch_sgd = torch.optim.SGD(
        [{"params": [reference.kernel], "weight_decay": 0.01}, {"params": [reference.bias], "weight_decay": 0.0}],
        lr=0.0,
        momentum=0.9,
        nesterov=nesterov,
    )
    grads = gradient_sequence(model, len(LRS))
    for got, want in zip(train(model, optimizer, grads, LRS), train(reference, torch_sgd, grads, LRS), strict=True):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def test_bfloat16_momentum_resumes_from_a_saved_state_dict_exactly():
    grads = gradient_sequence(TwoTensors(), len(LRS))
    unbroken = TwoTensors()
    train(unbroken, make_optimizer(unbroken, sgd(momentum_dtype="bfloat16")), grads, LRS)

    model = TwoTensors()
    optimizer = make_optimizer(model, sgd(momentum_dtype="bfloat16"))
    train(model, optimizer, grads[:5], LRS[:5])
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)
    assert all(state["momentum_buffer"].dtype == torch.bfloat16 for state in checkpoint["optimizer"]["state"].values())

    resumed = TwoTensors()
    resumed.load_state_dict(checkpoint["model"])
    optimizer = make_optimizer(resumed, sgd(momentum_dtype="bfloat16"))
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert all(optimizer.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in resumed.parameters())
    train(resumed, optimizer, grads[5:], LRS[5:])
    for got, want in zip(resumed.parameters(), unbroken.parameters(), strict=True):
        assert torch.equal(got, want)


# --- bad values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"optim": {"momentum_dtype": "float16"}}, "optim.momentum_dtype: expected one of float32, bfloat16"),
        ({"optim": {"name": "adamw", "momentum_dtype": "bfloat16"}}, "optim.momentum_dtype: bfloat16 is for SGD only"),
        ({"schedule": {"linear_end": -1e-5}}, "schedule.linear_end: must be 0 or more"),
        ({"schedule": {"linear_end": "small"}}, "schedule.linear_end: expected an integer or a number"),
    ],
)
def test_bad_optimizer_and_schedule_values_are_one_line_naming_the_field(raw, field):
    with pytest.raises(UserError) as error:
        resolve_recipe(raw)
    assert str(error.value).startswith(field) and "\n" not in str(error.value)
