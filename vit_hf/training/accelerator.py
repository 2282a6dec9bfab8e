"""The run's `Accelerator`: processes (GPUs, or CPU processes joined with gloo), mixed precision, gradient
accumulation, trackers, compilation, and FSDP where the launch asks for it, on GPUs or CPUs."""

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    TorchDynamoPlugin,
    parse_flag_from_env,
)

from vit_hf.recipe import accumulation_steps
from vit_hf.training.checkpoint import restart_store
from vit_hf.utils.errors import UserError


def gloo_on_cpu() -> bool:
    """Several processes and no GPU (`accelerate launch --multi_gpu`, torchrun): Accelerate must be told to use
    the CPU, or each process runs alone; with cpu=True it joins them with gloo."""
    return "LOCAL_RANK" in os.environ and not torch.cuda.is_available()


def make_accelerator(recipe: dict) -> Accelerator:
    """The Accelerator of a training run of RECIPE (its `train` and `output` sections).

    Its `gradient_accumulation_steps` reach `train.global_batch_size`; with `train.micro_batch_size: "auto"` they are
    1 until the micro-batch is found, and set then.
    """
    cfg, out = recipe["train"], recipe["output"]["dir"]
    cpu_processes = gloo_on_cpu()
    state = PartialState(cpu=cpu_processes, **restart_store())
    if cfg["mixed_precision"] == "fp16" and state.device.type == "cpu":
        # Accelerate gives the CPU neither fp16 autocast nor a gradient scaler: the run would be float32 labelled fp16.
        raise UserError(
            'train.mixed_precision: "fp16" needs a GPU (on the CPU Accelerate runs it as float32, without a gradient '
            'scaler); use "bf16", which the CPU autocasts, or "no"'
        )
    processes = state.num_processes
    accumulation = 1 if cfg["micro_batch_size"] == "auto" else accumulation_steps(recipe, processes)
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=cfg["mixed_precision"],
        # The data is one endless stream, as the official input pipeline: windows may span epochs.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
        # No seedable sampler: the loaders' own sampler is seeded (`vit_hf.data`), and Accelerate replaces only a
        # RandomSampler.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        step_scheduler_with_optimizer=False,  # the schedule is a function of the update count only
        log_with=cfg["report_to"] or None,  # [] would make Accelerate warn that no tracker is installed
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg["compile"] else None,
    )
    if cpu_processes and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        _fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and cfg["ema_decay"] is not None:
        raise UserError(
            "train.ema_decay: the weight average keeps a whole copy of the model on every process, which FSDP "
            "exists to avoid: set it to null, or train with DDP"
        )
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """FSDP on CPU gloo processes (`accelerate launch --config_file accelerate_configs/fsdp.yaml` without a GPU).

    Accelerate 1.x applies its FSDP plugin on accelerator devices only and runs such a launch as plain DDP on the CPU.
    Marking its state FSDP (both the process state and the accelerator's) sends `prepare`, `save_state`,
    `load_state` and `get_state_dict` down the same FSDP2 path as on GPUs: `fully_shard` works on gloo. The plugin
    reads the launch's FSDP_* settings, as Accelerate's own would.
    """
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    for state in (PartialState(), accelerator.state):  # AcceleratorState copies the process state's type when built
        state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (FSDP-sharded or replicated) DTensor; a plain tensor as it is."""
    # Duck-typed: importing torch.distributed.tensor would slow the start-up of runs that never shard.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def hardware(accelerator: Accelerator) -> str:
    """The processes and their device, e.g. "2x NVIDIA H100 80GB HBM3" or "1x CPU"."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return f"{accelerator.num_processes}x {name}"
