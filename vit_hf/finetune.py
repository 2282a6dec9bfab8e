"""Fine-tune (or train from scratch) a ViT with the official recipe, on any number of processes.

    accelerate launch -m vit_hf.finetune recipes/cifar10.json
    accelerate launch -m vit_hf.finetune recipes/cifar10.json --set train.micro_batch_size=32 --resume auto
    torchrun --nproc-per-node 8 -m vit_hf.finetune recipes/cifar10.json
    python -m vit_hf.finetune recipes/cifar10_cpu.json

SGD with momentum, warmup then cosine (or linear) decay stepped once per optimizer update, clipping of the
synchronised gradients, gradient accumulation up to `train.global_batch_size`; evaluation on minival every
`train.eval_every` updates; the best model on minival is exported into `output.dir` with `results.json`.

The run is one `FineTune` object in torchtune's recipe shape: `__init__` sets everything up, `train` runs the updates
(`update` is one accumulation window, in the order of a training step; `at_boundary` logs, evaluates, saves, stops),
and `finish` exports the best model, scores the test split and writes the card.
"""

import argparse
from pathlib import Path

from vit_hf.recipe import load_recipe
from vit_hf.training.run_folder import hold_run_folder, release_run_folder
from vit_hf.utils.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vit_hf.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a JSON recipe, e.g. recipes/cifar10.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE", help="override a field")
    parser.add_argument("--resume", help="'auto' (the latest checkpoint in output.dir) or a checkpoint folder")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    out = Path(recipe["output"]["dir"])
    hold_run_folder(out)  # a folder in use is refused before the imports below, which take seconds
    try:
        from transformers.utils.logging import disable_progress_bar

        from vit_hf.training.loop import run
        from vit_hf.training.remote_inputs import check_remote_inputs

        disable_progress_bar()  # transformers' save and load bars would interleave with the training bar
        check_remote_inputs(recipe)  # offline, every missing input in one line before any is loaded
        run(recipe, resume=args.resume)
    finally:
        release_run_folder(out)


if __name__ == "__main__":
    main()
