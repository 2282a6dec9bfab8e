"""Fitting the device: `train.micro_batch_size: "auto"` finds the largest micro-batch that runs a full training
step (forward, backward, optimizer, at the recipe's precision and image size), keeping the global batch exact."""

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import release_memory
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from vit_hf.training.optim import make_optimizer
from vit_hf.utils.errors import UserError


def micro_batch_candidates(per_process_batch: int) -> list[int]:
    """The micro-batches that divide a process's share of the global batch, largest first: the accumulation is then
    a whole number of micro-steps and the global batch stays what the recipe says."""
    return [size for size in range(per_process_batch, 0, -1) if per_process_batch % size == 0]


def _is_out_of_memory(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def _training_step(model: torch.nn.Module, recipe: dict, accelerator: Accelerator, size: int) -> None:
    """One step at micro-batch SIZE that leaves MODEL's weights as they were: the optimizer is the recipe's, with a
    learning rate of 0, so it allocates its state but every update adds exactly zero."""
    image_size = recipe["model"]["image_size"]
    optimizer = make_optimizer(model, recipe["optim"] | {"lr": 0.0})
    images = torch.zeros(size, 3, image_size, image_size, device=accelerator.device)
    labels = torch.zeros(size, dtype=torch.long, device=accelerator.device)
    try:
        with accelerator.autocast():
            loss = F.cross_entropy(model(pixel_values=images).logits.float(), labels)
        loss.backward()
        optimizer.step()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # an asynchronous allocation failure surfaces here, inside the try
    finally:
        optimizer.zero_grad(set_to_none=True)
        release_memory(optimizer)


def find_micro_batch(model: torch.nn.Module, recipe: dict, accelerator: Accelerator) -> int:
    """The largest candidate micro-batch whose training step fits on every process (they agree on the smallest)."""
    global_batch, processes = recipe["train"]["global_batch_size"], accelerator.num_processes
    if global_batch % processes:
        raise UserError(f"train.global_batch_size: {global_batch} is not divisible by {processes} processes")
    model.to(accelerator.device).train()
    fits = 0
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout's draws here must not shift the run's random stream
        for size in micro_batch_candidates(global_batch // processes):
            try:
                _training_step(model, recipe, accelerator, size)
            except Exception as error:
                if not _is_out_of_memory(error):
                    raise
                clear_device_cache(garbage_collection=True)
                continue
            fits = size
            break
    agreed = int(accelerator.gather(torch.tensor([fits], device=accelerator.device)).min())
    if agreed == 0:
        raise UserError(
            f'train.micro_batch_size: "auto" found no micro-batch that fits (not even 1 image of '
            f"{recipe['model']['image_size']} px); try train.gradient_checkpointing or a smaller model"
        )
    return agreed
