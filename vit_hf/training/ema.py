"""An exponential moving average of the weights (`train.ema_decay`), as timm's `--model-ema`.

Updated once per optimizer update: average = weights after the first update, then
average <- decay * average + (1 - decay) * weights (torch's `AveragedModel` with `get_ema_multi_avg_fn` does the same
arithmetic). Unlike `AveragedModel`, the update count is a Python integer, so an update never waits for the device.
"""

import copy

import torch


class WeightAverage:
    """The averaged copy of a model (`.model`, in eval mode, never trained), saved in every checkpoint."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def _floats(self, model: torch.nn.Module) -> list[torch.Tensor]:
        # Parameters and floating buffers, in one fixed order (integer buffers are not averaged).
        return [tensor for tensor in model.state_dict(keep_vars=True).values() if tensor.is_floating_point()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold MODEL's current weights into the average."""
        averaged, current = self._floats(self.model), [t.detach() for t in self._floats(model)]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = state["updates"]
