"""Random numbers for the batched augmentations, drawn from an optional `torch.Generator` on its own device and
moved to the images' device: uniform, integer, normal and Beta samples."""

import math

import torch
from torch import Tensor

# Marsaglia-Tsang accepts a Gamma candidate with probability above 0.95 (shape >= 1): all of 16 are rejected
# with probability below 1e-20.
GAMMA_CANDIDATES = 16


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Draw on the generator's own device, so that a CPU generator also drives images on a GPU."""
    return generator.device if generator is not None else device


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=_draw_device(generator, device)).to(device)


def integers(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(high, shape, generator=generator, device=_draw_device(generator, device)).to(device)


def normal(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=dtype, device=_draw_device(generator, device)).to(device)


def _log_uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """log(U) for U uniform in (0, 1]: finite, unlike the log of torch.rand's 0."""
    return (1 - uniform(shape, generator, device)).log()


def _log_gamma(alpha: float, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Logarithms of Gamma(alpha, 1) samples by Marsaglia and Tsang (2000), vectorised: of GAMMA_CANDIDATES
    candidates d * v, v = (1 + c * x)^3 with x standard normal, the first that passes the acceptance test is
    kept. Below 1, Gamma(alpha) = Gamma(alpha + 1) * U^(1 / alpha), added as a log so that it cannot underflow."""
    shape_above_one = alpha if alpha >= 1 else alpha + 1
    d = shape_above_one - 1 / 3
    c = 1 / math.sqrt(9 * d)
    x = normal((*shape, GAMMA_CANDIDATES), generator, device)
    log_u = _log_uniform((*shape, GAMMA_CANDIDATES), generator, device)
    v = (1 + c * x) ** 3
    log_v = v.log()  # NaN where v <= 0: those candidates are rejected by the v > 0 test
    accepted = (v > 0) & (log_u < x**2 / 2 + d - d * v + d * log_v)
    first_accepted = accepted.int().argmax(dim=-1, keepdim=True)
    log_gamma = math.log(d) + log_v.gather(-1, first_accepted).squeeze(-1)
    # No candidate accepted (probability below 1e-20): log(d), near the mean, keeps the sample finite.
    log_gamma = torch.where(accepted.any(dim=-1), log_gamma, math.log(d))
    if alpha < 1:
        log_gamma = log_gamma + _log_uniform(shape, generator, device) / alpha
    return log_gamma


def sample_beta(
    alpha: float, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """Beta(alpha, alpha) samples (float32) on `device` from `generator`, which torch.distributions.Beta does
    not take: X / (X + Y) for independent X, Y ~ Gamma(alpha)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    device = torch.device(device)
    log_x, log_y = _log_gamma(alpha, (2, *shape), generator, device).unbind(0)
    # X / (X + Y) as sigmoid(log X - log Y): exact where X and Y are both too small for a float.
    return torch.sigmoid(log_x - log_y)
