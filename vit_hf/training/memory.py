"""Fitting the device: `train.micro_batch_size: "auto"` finds the largest micro-batch whose training step fits, keeping
the global batch exact.

The search runs on the model exactly as it will train: prepared by Accelerate (DDP or FSDP wrapping, compiled where
asked), with its adapters, drop path and gradient checkpointing, and with the weight average already in memory. A
candidate's trial step (forward, backward, the recipe's optimizer, at its precision and image size) fits when it
raises no out-of-memory error and its peak memory, beyond what the run held before it, stays within
`1 - HEADROOM` of the memory free at the start of the search.
"""

import contextlib
import os
from collections.abc import Iterator

import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vit_hf.training.optim import make_optimizer
from vit_hf.utils.errors import UserError

# The share of the free memory that the measured step must leave unused: the trial does not see the allocator's
# fragmentation, the loader's batches of a whole accumulation window, evaluation or a checkpoint's save.
HEADROOM = 0.10


def micro_batch_candidates(per_process_batch: int) -> list[int]:
    """The micro-batches that divide a process's share of the global batch, largest first: the accumulation is then
    a whole number of micro-steps and the global batch stays what the recipe says."""
    return [size for size in range(per_process_batch, 0, -1) if per_process_batch % size == 0]


def _is_out_of_memory(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def free_memory(accelerator: Accelerator) -> int:
    """The bytes this process may still take: on an accelerator, what its driver reports free plus the blocks torch
    holds unused; on the CPU, this machine's available memory shared by its processes."""
    device = accelerator.device
    if device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        return psutil.virtual_memory().available // max(local_processes, 1)
    free, _ = torch.accelerator.get_memory_info(device)
    return free + torch.accelerator.memory_reserved(device) - torch.accelerator.memory_allocated(device)


class _CpuPeak(TorchDispatchMode):
    """The CPU allocator keeps no statistics: this counts the bytes of the storages that the ops run under it
    create and that are still alive, op by op, and keeps the highest count."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= size
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                try:
                    storage = tensor.untyped_storage()
                except (NotImplementedError, RuntimeError):  # a tensor subclass without storage of its own
                    continue
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class Peak:
    """The peak memory of a measured stretch of code, in bytes, beyond what was allocated before it."""

    bytes = 0


@contextlib.contextmanager
def measured_peak(device: torch.device) -> Iterator[Peak]:
    """Measures the peak memory of the code run inside (set on the `Peak` it yields when the code is done)."""
    result = Peak()
    if device.type == "cpu":
        with _CpuPeak() as counter:
            yield result
        result.bytes = counter.peak
        return
    torch.accelerator.synchronize(device)
    torch.accelerator.reset_peak_memory_stats(device)
    start = torch.accelerator.memory_allocated(device)
    yield result
    torch.accelerator.synchronize(device)  # an asynchronous allocation failure surfaces here, inside the trial
    result.bytes = torch.accelerator.max_memory_allocated(device) - start


def _unsynchronised(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """DDP's `no_sync`: each process tries its sizes alone, its trial gradients zeroed after. Not FSDP's: it would
    keep the unsharded trial gradients for the next synchronised backward, the run's first update; under FSDP every
    process tries the same sizes in step, as the all-gathers of its forward need anyway."""
    ddp = getattr(model, "_orig_mod", model)  # train.compile wraps the DDP module
    return ddp.no_sync() if isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext()


def step_peak(model: torch.nn.Module, recipe: dict, accelerator: Accelerator, size: int) -> int:
    """The peak memory (bytes) of one training step of the prepared MODEL at micro-batch SIZE, which leaves its
    weights as they were: the optimizer is the recipe's with a learning rate of 0, so it allocates its state but
    every update adds exactly zero."""
    image_size = recipe["model"]["image_size"]
    optimizer = make_optimizer(accelerator.unwrap_model(model), recipe["optim"] | {"lr": 0.0})
    try:
        with measured_peak(accelerator.device) as peak, _unsynchronised(model):
            images = torch.zeros(size, 3, image_size, image_size, device=accelerator.device)
            labels = torch.zeros(size, dtype=torch.long, device=accelerator.device)
            with accelerator.autocast():
                loss = F.cross_entropy(model(pixel_values=images).logits.float(), labels)
            loss.backward()
            optimizer.step()
            del images, labels, loss
    finally:
        model.zero_grad(set_to_none=True)
        optimizer.state.clear()  # freed with the garbage collection after the trial
    return peak.bytes


def _fits(model: torch.nn.Module, recipe: dict, accelerator: Accelerator, size: int, budget: int) -> bool:
    try:
        return step_peak(model, recipe, accelerator, size) <= budget
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        return False
    finally:
        clear_device_cache(garbage_collection=True)


def find_micro_batch(model: torch.nn.Module, recipe: dict, accelerator: Accelerator) -> int:
    """The largest candidate micro-batch whose training step of the prepared MODEL fits on every process (they agree
    on the smallest)."""
    cfg, processes = recipe["train"], accelerator.num_processes
    if cfg["global_batch_size"] % processes:
        raise UserError(
            f"train.global_batch_size: {cfg['global_batch_size']} is not divisible by {processes} processes"
        )
    budget = int(free_memory(accelerator) * (1 - HEADROOM))
    fits = 0
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout's draws here must not shift the run's random stream
        for size in micro_batch_candidates(cfg["global_batch_size"] // processes):
            if _fits(model, recipe, accelerator, size, budget):
                fits = size
                break
    agreed = int(accelerator.gather(torch.tensor([fits], device=accelerator.device)).min())
    if agreed == 0:
        advice = (
            "a smaller model" if cfg["gradient_checkpointing"] else "train.gradient_checkpointing or a smaller model"
        )
        raise UserError(
            f'train.micro_batch_size: "auto" found no micro-batch that fits (not even 1 image of '
            f"{recipe['model']['image_size']} px, keeping {HEADROOM:.0%} of the free memory spare); try {advice}"
        )
    return agreed
