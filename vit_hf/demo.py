"""Serve a model folder's demo page: upload an image, see its top-5 classes and the attention rollout over it.

    python -m vit_hf.demo outputs/cifar10-vit-b16-224 --port 7860
    python -m vit_hf.demo outputs/cifar10-int8 --attention-model outputs/cifar10-vit-b16-224

A Gradio app on 127.0.0.1 (this machine only) by default, with no share link and no analytics. Its function answers
gradio_client as api_name="/predict". An ONNX folder has no attention weights: give the PyTorch folder it was exported
from as --attention-model for the rollout.
"""

import argparse
import os

from transformers.utils.logging import disable_progress_bar

from vit_hf.serving.backends import load_served
from vit_hf.serving.demo_app import build_demo, check_port, rollout_model
from vit_hf.utils.errors import UserError, cli_entry


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder, PyTorch or ONNX")
    parser.add_argument("--port", type=int, default=7860, help="the port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default 127.0.0.1)")
    parser.add_argument("--attention-model", help="for an ONNX folder: the PyTorch folder to draw the rollout with")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no version check, no telemetry
    check_port(args.host, args.port)  # before the model loads: a taken port is known at once
    disable_progress_bar()  # stderr is for errors
    backend, preprocessing = load_served(args.model_dir)
    demo = build_demo(backend, preprocessing, rollout_model(backend, args.attention_model))
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, footer_links=[])
    except OSError as error:  # taken between the check and the launch
        raise UserError(f"--port {args.port}: cannot serve on {args.host}:{args.port} ({error})") from None


if __name__ == "__main__":
    main()
