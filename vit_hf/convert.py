"""Official ViT `.npz` checkpoints <-> transformers' `ViTForImageClassification`, exactly.

    python -m vit_hf.convert ViT-B_16 out/vit-b16-cifar10 --image-size 224 --labels airplane,automobile,...
    python -m vit_hf.convert imagenet21k+imagenet2012/ViT-B_16 out/vit-b16-in1k --keep-head
    python -m vit_hf.convert --to-npz out/my-finetuned-model my-finetuned-model.npz

The architecture is read from the tensors' shapes. Two facts of the official Flax model are carried in the
saved config so that `from_pretrained` gives the official numbers: LayerNorm epsilon 1e-6 and the tanh
approximation of GELU (`jax.nn.gelu`'s default).
"""

import argparse
import logging
from pathlib import Path

from transformers import ViTForImageClassification

from vit_hf.models.conversion import load_npz, save_npz
from vit_hf.publish.model_dir import save_model_dir
from vit_hf.utils.errors import UserError, cli_entry


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a local .npz, an http(s) URL, or a catalog name such as ViT-B_16")
    parser.add_argument("out", help="the output folder (or, with --to-npz, the output .npz)")
    parser.add_argument("--image-size", type=int, help="fine-tuning resolution: resamples the position embeddings")
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--num-labels", type=int, help="classes of the new zero-initialised head")
    classes.add_argument("--labels", help="comma-separated class names of the new head")
    classes.add_argument("--keep-head", action="store_true", help="keep the file's head and classes")
    parser.add_argument("--to-npz", action="store_true", help="the way back: SOURCE is a model folder")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    if args.to_npz:
        if not (Path(args.source) / "config.json").is_file():
            raise UserError(f"{args.source}: not a model folder (no config.json)")
        model = ViTForImageClassification.from_pretrained(args.source)
        print(f"wrote {save_npz(model, args.out)}")
        return
    labels = [name.strip() for name in args.labels.split(",")] if args.labels else None
    if args.num_labels is not None and args.num_labels < 1:
        raise UserError(f"--num-labels must be at least 1, got {args.num_labels}")
    if not args.keep_head and labels is None and args.num_labels is None:
        raise UserError("give --num-labels N or --labels a,b,c for a new head, or --keep-head")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be positive, got {args.image_size}")
    model, report = load_npz(
        args.source,
        image_size=args.image_size,
        num_labels=args.num_labels,
        labels=labels,
        keep_head=args.keep_head,
    )
    save_model_dir(model, args.out)
    c = model.config
    print(
        f"wrote {args.out}: ViT hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
        f"patch {c.patch_size}, {c.image_size} px, {c.num_labels} classes; {len(report.mapped)} tensors mapped, "
        f"{len(report.dropped)} dropped"
    )


if __name__ == "__main__":
    main()
