"""What an ONNX folder says about itself: the model card (README.md) and the summary the export prints, both from
the report of its verification (onnx_export.json)."""

from pathlib import Path

QUANTIZATION = (
    "dynamic quantization: int8 weights with one scale per output channel; activations quantized at run time with "
    "one scale per tensor, so an image's int8 logits depend slightly on the other images of its batch"
)


def fp32_line(report: dict) -> str:
    check = report["fp32_check"]
    return (
        f"fp32 export: logits within {check['max_abs_logit_difference']:.1e} of PyTorch's "
        f"(tolerance {check['tolerance']:.0e}) on {check['inputs']}"
    )


def int8_lines(report: dict) -> list[str]:
    """The int8 figures as sentences: the agreement, then what the accuracy lost, or that it was not measured."""
    figures = report["int8"]
    lines = [f"int8: the fp32 export's top-1 class on {figures['top1_agreement']:.2%} of {figures['inputs']}"]
    if figures["accuracy_fp32"] is None:
        lines.append(
            "accuracy was not measured: exported without --recipe, so no labelled data was at hand; "
            "measure it with python -m vit_hf.validate on this folder and on the source"
        )
    else:
        lost = figures["accuracy_points_lost"]
        lines.append(
            f"accuracy on {figures['inputs']}: fp32 {figures['accuracy_fp32']:.2%}, int8 {figures['accuracy_int8']:.2%}"
            f" ({'lost' if lost >= 0 else 'gained'} {abs(lost):.2f} points)"
        )
    return lines


def summary_lines(report: dict, out_dir: Path) -> list[str]:
    """What the export prints: the checks it passed, then where it wrote."""
    lines = [fp32_line(report), *(int8_lines(report) if "int8" in report else [])]
    return [*lines, f"wrote {out_dir} ({', '.join(report['files'])})"]


def card_text(report: dict, name: str) -> str:
    """README.md of an ONNX folder: what it is, how it was verified and, for int8, what it lost."""
    precision = report["precision"]
    tags = "\n".join(f"  - {tag}" for tag in ("vit", "onnx", *(["int8"] if precision == "int8" else [])))
    lines = [
        f"---\nlibrary_name: onnx\npipeline_tag: image-classification\ntags:\n{tags}\n---\n",
        f"# {name}: {precision} ONNX export\n",
        f"`model.onnx` ({precision}) is the classifier of `{report['source']}` (model.safetensors sha256 "
        f"`{report['source_sha256'][:16]}...`), exported by `python -m vit_hf.onnx` on {report['date']} with torch "
        f"{report['torch']}, ONNX opset {report['opset']}, a dynamic batch axis. `config.json` and "
        "`preprocessor_config.json` are the source folder's.\n",
        f"Serve it as the PyTorch folder: `python -m vit_hf.predict {name} photos/`; evaluate it with "
        f"`python -m vit_hf.validate {name} --recipe RECIPE`; run it in ONNX Runtime with the input `pixel_values`.\n",
        "## Verification\n",
        f"- {fp32_line(report)}.",
    ]
    if precision == "int8":
        agreement, accuracy = int8_lines(report)
        lines += [f"- {agreement}; {QUANTIZATION}.\n", "## What int8 lost\n", f"- {accuracy[0].upper()}{accuracy[1:]}."]
    else:
        lines.append("- Its accuracy is the source model's: the logits match within the tolerance above.")
    return "\n".join(lines) + "\n"
