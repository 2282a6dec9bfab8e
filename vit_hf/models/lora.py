"""LoRA fine-tuning (Hu et al., 2021, https://arxiv.org/abs/2106.09685) through peft, for `model.lora`.

The pretrained weights stay frozen; low-rank adapters on `model.lora.target_modules` and the new classification head
(a peft `modules_to_save` copy) train. Checkpoints hold the whole peft model, so a resume is exact; the model folder a
run exports holds plain ViT weights with the adapters merged (W + alpha / r * B @ A), which `from_pretrained` and
`pipeline("image-classification")` load without peft.
"""

import sys
from typing import TYPE_CHECKING

import torch
from transformers import ViTForImageClassification

if TYPE_CHECKING:  # peft is imported by add_lora, so that runs without LoRA do not import it
    from peft import PeftModel

HEAD = "classifier"
ADAPTER = "default"  # peft's name for a model's only adapter
PREFIX = "base_model.model."  # where a PeftModel keeps the model it adapts, in its state dict


def add_lora(model: ViTForImageClassification, lora: dict) -> "PeftModel":
    """MODEL with adapters as the recipe's `model.lora` section says; every other weight but the head frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        modules_to_save=[HEAD],
    )
    return get_peft_model(model, config, adapter_name=ADAPTER)


def merged_state_dict(model: "PeftModel", state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain ViTForImageClassification weights of MODEL's full STATE (e.g. gathered under FSDP).

    An adapted layer's weight becomes W + scaling * B @ A; the head's trained copy replaces the original; the adapters
    and the untrained head are left out.
    """
    config = model.peft_config[ADAPTER]
    scaling = config.lora_alpha / config.r
    merged = {}
    for key, value in state.items():
        module, _, param = key.removeprefix(PREFIX).rpartition(".")
        if module.endswith((f".lora_A.{ADAPTER}", f".lora_B.{ADAPTER}", ".original_module")):
            continue
        if module.endswith(".base_layer"):
            module = module.removesuffix(".base_layer")
            if param == "weight":
                down, up = (state[f"{PREFIX}{module}.lora_{ab}.{ADAPTER}.weight"] for ab in "AB")
                value = value + scaling * (up.float() @ down.float()).to(value.dtype)
        module = module.removesuffix(f".modules_to_save.{ADAPTER}")
        merged[f"{module}.{param}"] = value
    return merged


def exportable(
    model: torch.nn.Module, state: dict[str, torch.Tensor] | None
) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
    """The model and weights a model folder is saved from: a LoRA model's plain ViT and its merged weights (from STATE,
    or the model's own when None); any other model as it is."""
    peft = sys.modules.get("peft")  # a LoRA model was made by add_lora, which imported it
    if peft is None or not isinstance(model, peft.PeftModel):
        return model, state
    return model.get_base_model(), merged_state_dict(model, model.state_dict() if state is None else state)
