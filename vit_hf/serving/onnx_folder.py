"""`python -m vit_hf.onnx`: a PyTorch model folder exported to an ONNX folder, verified before it is written.

The folder is staged beside OUT_DIR and renamed into place only after the fp32 graph's logits matched PyTorch's:
an export that fails verification leaves no folder behind.
"""

import datetime
import hashlib
import shutil
from pathlib import Path

import torch

from vit_hf.publish.model_dir import check_model_dir, load_model_dir
from vit_hf.serving.backends import WEIGHTS_FILE, folder_kind
from vit_hf.serving.export import check_export_packages, export_onnx, quantize_int8
from vit_hf.serving.onnx_backend import CONFIG_FILE, ONNX_FILE, OnnxBackend, onnx_session
from vit_hf.serving.onnx_card import card_text
from vit_hf.serving.preprocess import PROCESSOR_FILE
from vit_hf.serving.verify import FP32_TOLERANCE, check_classes, int8_figures, logit_gap
from vit_hf.serving.verify_inputs import Inputs
from vit_hf.utils.errors import RunError, UserError
from vit_hf.utils.files import atomic_dir, public_name, write_json, write_text

EXPORT_JSON = "onnx_export.json"
CARD_FILE = "README.md"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_source(model_dir: Path) -> None:
    """Refuse, in one line, a folder that is not a PyTorch model folder."""
    if folder_kind(model_dir) == "onnx":
        raise UserError(f"{model_dir}: already an ONNX folder; export the PyTorch folder it came from")
    check_model_dir(model_dir)


def export_folder(
    model_dir: Path, out_dir: Path, check_inputs: Inputs, figure_inputs: Inputs, quantize: str | None = None
) -> dict:
    """Export MODEL_DIR into OUT_DIR as model.onnx (int8 with QUANTIZE="int8"), verified; returns the report.

    The fp32 graph must match PyTorch's logits within FP32_TOLERANCE on CHECK_INPUTS; the int8 graph's agreement and
    accuracy are measured on FIGURE_INPUTS. Both go into onnx_export.json and README.md.
    """
    check_source(model_dir)
    check_export_packages()
    model = load_model_dir(model_dir).float().eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for inputs in (check_inputs, figure_inputs):
        check_classes(labels, inputs, str(model_dir))
    report = _report_head(model_dir, quantize)
    with atomic_dir(out_dir) as staging:
        for name in (CONFIG_FILE, PROCESSOR_FILE):
            shutil.copy2(model_dir / name, staging / name)
        fp32_path = staging / "fp32" / ONNX_FILE if quantize else staging / ONNX_FILE
        fp32_path.parent.mkdir(exist_ok=True)
        export_onnx(model, fp32_path)
        fp32 = onnx_session(fp32_path)
        report["opset"] = _opset(fp32_path)
        report["fp32_check"] = _check_fp32(model, fp32, check_inputs, out_dir)
        if quantize:
            quantize_int8(fp32_path, staging / ONNX_FILE)
            report["int8"] = int8_figures(fp32, onnx_session(staging / ONNX_FILE), figure_inputs)
            del fp32
            shutil.rmtree(fp32_path.parent)
        OnnxBackend(staging)  # the folder loads as it will be served: its graph matches its config
        report["files"] = sorted(path.name for path in staging.iterdir()) + [EXPORT_JSON, CARD_FILE]
        write_json(staging / EXPORT_JSON, report)
        write_text(staging / CARD_FILE, card_text(report, out_dir.name))
    return report


def _report_head(model_dir: Path, quantize: str | None) -> dict:
    import onnxruntime  # the [onnx] extra, checked by check_export_packages

    return {
        "source": public_name(str(model_dir)),
        "source_sha256": _sha256(model_dir / WEIGHTS_FILE),
        "precision": quantize or "fp32",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _opset(path: Path) -> int:
    """The default-domain opset of the graph at PATH."""
    import onnx  # the [onnx] extra, checked by check_export_packages

    model = onnx.load(path, load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _check_fp32(model, session, inputs: Inputs, out_dir: Path) -> dict:
    """The fp32 check's figures; a RunError (nothing written) where the logits are further from PyTorch's than
    FP32_TOLERANCE."""
    gap = logit_gap(model, session, inputs)
    if not gap <= FP32_TOLERANCE:
        raise RunError(
            f"{out_dir}: not written: the ONNX export's logits differ from PyTorch's by {gap:.2e} on "
            f"{inputs.description} (tolerance {FP32_TOLERANCE:.0e})"
        )
    return {"inputs": inputs.description, "images": inputs.count, "max_abs_logit_difference": gap,
            "tolerance": FP32_TOLERANCE}  # fmt: skip
