"""Push a fine-tuning run's model to the Hugging Face Hub, with a fresh model card.

    python -m vit_hf.push outputs/cifar10-vit-b16-224 --model-id user/vit-b16-cifar10 [--private]

Uploads model.safetensors, config.json, preprocessor_config.json, README.md (the model card, rewritten first),
recipe.json, results.json and training_curves.png; the run's checkpoints/ and runs/ stay local. The token comes
from HF_TOKEN or from `hf auth login`. An upload that fails mid-way (exit 1) leaves the folder as it was: run the
same command again.
"""

import argparse

from vit_hf.publish.hub import push_to_hub
from vit_hf.utils.errors import cli_entry


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the output folder of a fine-tuning run (output.dir of its recipe)")
    parser.add_argument("--model-id", required=True, help="the Hub repository, user/name (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    url = push_to_hub(args.output_dir, args.model_id, private=args.private)
    print(f"pushed {args.output_dir} to {url}")


if __name__ == "__main__":
    main()
