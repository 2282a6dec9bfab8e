"""`train.ema_decay`: the exponential moving average of the weights, checked against an average written here."""

import json
import shutil

import pytest
import torch
from runs import run_here, tiny_recipe, weights

from vit_hf.recipe import resolve_recipe
from vit_hf.training.ema import WeightAverage

DECAY = 0.6


def test_the_average_is_the_first_weights_then_decay_times_average_plus_the_rest():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    average = WeightAverage(model, DECAY)
    states = []
    for _ in range(5):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        average.update(model)
        states.append({k: v.clone() for k, v in model.state_dict().items()})

    expected = states[0]
    for state in states[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * state[k] for k in state}
    for key, value in average.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    assert average.updates == 5 and not any(p.requires_grad for p in average.model.parameters())


def test_a_decay_outside_0_1_is_one_line_naming_the_field():
    with pytest.raises(Exception, match=r"^train.ema_decay: must be in \(0, 1\) or null, got 1.5$"):
        resolve_recipe({"train": {"ema_decay": 1.5}})


def _ema_state(checkpoint) -> dict:
    # Registered second, after Progress: custom_checkpoint_1.
    return torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=True)


@pytest.mark.slow
def test_the_loop_averages_every_update_exports_the_better_and_resumes_exactly(cifar10_dir, tmp_path):
    sections = {
        "train": {"ema_decay": DECAY, "save_every": 1, "keep_checkpoints": 6, "eval_every": 2, "log_every": 1},
        "data": {"augment": {"crop_scale": [0.5, 1.0]}},
    }
    unbroken = tmp_path / "unbroken"
    run_here(tiny_recipe(cifar10_dir, unbroken, **sections))
    checkpoints = unbroken / "checkpoints"

    # The average of the weights after updates 1..6, by hand, from the checkpoints of each update.
    expected = weights(checkpoints / "step_1")
    for step in range(2, 7):
        current = weights(checkpoints / f"step_{step}")
        expected = {k: DECAY * expected[k] + (1 - DECAY) * current[k] for k in current}
    averaged = _ema_state(checkpoints / "step_6")
    assert averaged["updates"] == 6
    for key, value in expected.items():
        torch.testing.assert_close(averaged["weights"][f"{key}"], value, rtol=0, atol=1e-6, msg=key)

    # Minival of both at every evaluation; the exported one is the first strictly best, the raw weights on a tie.
    rows = [json.loads(line) for line in (unbroken / "eval_log.jsonl").read_text().splitlines()]
    candidates = [row for row in rows if row["split"] in ("eval", "eval_ema")]
    assert len(candidates) == 6  # steps 2, 4, 6, each twice
    best = None
    for row in candidates:
        if best is None or row["accuracy"] > best["accuracy"]:
            best = row
    results = json.loads((unbroken / "results.json").read_text())
    assert results["best_step"] == best["step"] and results["eval_accuracy"] == best["accuracy"]
    assert results["exported_weights"] == ("ema average" if best["split"] == "eval_ema" else "trained")

    # Resumed from the checkpoint of update 3, the average continues as in the unbroken run.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints / "step_3", resumed / "checkpoints" / "step_3")
    run_here(tiny_recipe(cifar10_dir, resumed, **sections), resume="auto")
    again = _ema_state(resumed / "checkpoints" / "step_6")
    for key, value in averaged["weights"].items():
        torch.testing.assert_close(again["weights"][key], value, rtol=0, atol=1e-6, msg=key)
