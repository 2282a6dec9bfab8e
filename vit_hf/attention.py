"""Where the model looks: attention rollout maps over images, as PNG files.

    python -m vit_hf.attention outputs/cifar10-vit-b16-224 cat.jpg photos/ --out attention_maps

writes `attention_maps/<image stem>_attention.png` per image: the image and its rollout heat map side by side,
the predicted label in the title. Attention rollout is Abnar and Zuidema, 2020, "Quantifying Attention Flow in
Transformers" (https://arxiv.org/abs/2005.00928).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers.utils.logging import disable_progress_bar

from vit_hf.data.images import image_paths, load_image
from vit_hf.publish.attention_maps import attention_rollout, rollout_figure
from vit_hf.publish.model_dir import load_model_and_processor
from vit_hf.utils.errors import UserError, cli_entry


def _output_paths(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """OUT_DIR/<stem>_attention.png per image, refusing two images whose maps would overwrite each other."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise UserError(f"{seen[path.stem]} and {path} share the name {path.stem!r}: their maps would collide")
        seen[path.stem] = path
    return [out_dir / f"{path.stem}_attention.png" for path in paths]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder (the output of a fine-tuning run or of vit_hf.convert)")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="the folder to write <image stem>_attention.png into")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    disable_progress_bar()  # stderr is for errors; stdout for the results
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    paths = image_paths(args.images)
    out_paths = _output_paths(paths, Path(args.out))
    model, processor = load_model_and_processor(args.model_dir, attn_implementation="eager")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(paths), args.batch_size):
        images = [load_image(path) for path in paths[start : start + args.batch_size]]
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        maps = attention_rollout(model, pixel_values)
        with torch.no_grad():
            scores, predicted = model(pixel_values.to(model.device)).logits.softmax(dim=-1).max(dim=-1)
        for i, image in enumerate(images):
            path, out_path = paths[start + i], out_paths[start + i]
            label = model.config.id2label[int(predicted[i])]
            rollout_figure(image, maps[i], f"{path.name}: {label} ({float(scores[i]):.0%})").savefig(out_path, dpi=120)
            print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
