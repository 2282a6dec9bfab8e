"""The train-time input chain: a uint8 micro-batch from the loader to the model's inputs and targets, on the device.

Order: crop/resize/flip (`DeviceTransform`) -> RandAugment or TrivialAugment on [0, 1] -> [-1, 1] -> random erasing
-> Mixup or CutMix (soft targets). With none of the extras this is exactly the official training transform.
"""

import torch
import torch.nn.functional as F

from vit_hf.data.augment import rand_augment, trivial_augment
from vit_hf.data.mixing import mixup_cutmix, random_erasing
from vit_hf.data.transforms import DeviceTransform, to_model_range


class TrainInputs:
    """Turns a uint8 micro-batch into model inputs and targets with the recipe's augmentation, on the device."""

    def __init__(self, recipe: dict, num_classes: int, generator: torch.Generator) -> None:
        self.augment = recipe["data"]["augment"] or {}
        self.generator = generator
        self.num_classes = num_classes
        self.label_smoothing = recipe["train"]["label_smoothing"]
        self.transform = DeviceTransform(
            recipe["model"]["image_size"],
            train=True,
            crop_scale=self.augment.get("crop_scale"),
            hflip=self.augment.get("hflip", False),
        )

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs and targets of a batch; one the loader's workers already cropped ("prepared") is only scaled."""
        augment, generator, prepared = self.augment, self.generator, batch["prepared"]
        if augment.get("rand_augment") or augment.get("trivial_augment"):
            images = self.transform.geometry(batch["pixels"], generator, prepared)
            if augment.get("rand_augment"):
                images = rand_augment(images, **augment["rand_augment"], generator=generator)
            else:
                images = trivial_augment(images, generator=generator)
            images = to_model_range(images)
        else:
            images = self.transform(batch["pixels"], generator, prepared)
        if augment.get("random_erasing"):
            images = random_erasing(images, augment["random_erasing"], generator=generator)
        if augment.get("mixup_alpha") or augment.get("cutmix_alpha"):
            return mixup_cutmix(
                images,
                batch["labels"],
                self.num_classes,
                mixup_alpha=augment["mixup_alpha"],
                cutmix_alpha=augment["cutmix_alpha"],
                prob=augment["mix_prob"],
                switch_prob=augment["switch_prob"],
                label_smoothing=self.label_smoothing,
                generator=generator,
            )
        return images, batch["labels"]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, the mean over the micro-batch; soft targets already carry the label smoothing."""
        if targets.ndim == 2:
            return F.cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
