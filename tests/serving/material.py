"""What the serving tests share besides fixtures: the CIFAR-10 class names, the eval split's size, and the export
command run in the test's own process."""

from launch import run_in_process

from vit_hf.onnx import main as onnx_main

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EVAL_ROWS = 100


def export(capsys, *args) -> tuple[int, str, str]:
    """`python -m vit_hf.onnx ARGS` in this process: exit code, stdout, stderr."""
    return run_in_process(onnx_main, args, capsys)
