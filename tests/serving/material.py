"""What the serving tests share besides fixtures: the CIFAR-10 class names, the eval split's size, and the export
command run in the test's own process."""

from vit_hf.onnx import main as onnx_main

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EVAL_ROWS = 100


def export(capsys, *args) -> tuple[int, str, str]:
    """`python -m vit_hf.onnx ARGS` in this process: exit code, stdout, stderr."""
    try:
        onnx_main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code)
    out, err = capsys.readouterr()
    return code, out, err
