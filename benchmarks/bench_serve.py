"""Serving speed: pipeline("image-classification") against vit_hf's serving, at ViT-B/16 shapes, on this machine.

    python benchmarks/bench_serve.py --work /tmp/bench_serve
    python benchmarks/bench_serve.py --work /tmp/bench_serve --repeats 5 --sets photos --cases pipeline onnx-int8
    python benchmarks/bench_serve.py --work /tmp/bench_serve --photos ~/Pictures/jpegs
    python benchmarks/bench_serve.py --work /tmp/bench_serve --accuracy outputs/tiny --recipe recipes/tiny.json

Five cases classify the same images at batch 8: pipeline() in fp32 (the baseline), and vit_hf's serving (the code of
`python -m vit_hf.predict`) with torch fp32, torch bf16 autocast, ONNX Runtime fp32 and ONNX Runtime int8. The model
is a randomly initialised ViT-B/16 (224 px, 10 classes), saved as a model folder and exported with
`python -m vit_hf.onnx` (speed does not depend on the weights). Two sets of images: 96 JPEG photos of 300-640 px
(CIFAR-10 test images enlarged, bicubic, quality 90; or the JPEGs of --photos) and 96 CIFAR-10 test images as stored
(32 px PNGs). Two measures:
- whole process: a fresh python that imports, loads the folder, reads and classifies every image and prints its JSON
  lines (`python -m vit_hf.predict`; for pipeline() and bf16, this script's --child doing the same), timed from
  outside;
- in process: the same in a process that loaded the model and warmed it up on one batch; the first
  --in-process-images images of the set are timed.
Within each repeat the cases alternate (in a rotating order), so other work on the machine slows them alike; the
median of the repeats is reported, as a JSON line per case and set, then a table of images/s and ratios to pipeline()
(the median of each repeat's ratio).

--accuracy MODEL_DIR --recipe RECIPE exports MODEL_DIR (a real fine-tuned model) to int8 with --quantize int8 and
prints the accuracy of fp32 and int8 on the recipe's eval split (or --split), as the export measured them.
"""

import argparse
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ["pipeline", "torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8"]
SETS = ["photos", "cifar"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FOLDERS = {"torch-fp32": "vit-b16", "torch-bf16": "vit-b16", "pipeline": "vit-b16", "onnx-fp32": "vit-b16-onnx",
           "onnx-int8": "vit-b16-int8"}  # fmt: skip


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/bench_serve", help="folder for the models and images (kept, reused)")
    parser.add_argument("--cifar", help="the CIFAR-10 parquet folder (default: $VIT_HF_SHARED or ../shared's)")
    parser.add_argument("--photos", help="a folder of JPEG photos to use instead of enlarged CIFAR-10 images")
    parser.add_argument("--images", type=int, default=96, help="images per set (default 96)")
    parser.add_argument("--in-process-images", type=int, default=32, help="images timed in process (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass, every case (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES, help="the cases to run")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=SETS, help="the sets of images")
    parser.add_argument("--measures", nargs="+", choices=["whole", "in-process"], default=["whole", "in-process"])
    parser.add_argument("--accuracy", metavar="MODEL_DIR", help="measure int8 against fp32 accuracy of this model")
    parser.add_argument("--recipe", help="with --accuracy: the recipe whose eval split is measured on")
    parser.add_argument("--split", help="with --accuracy: train, eval, test or a split expression")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "MODEL_DIR", "IMAGES"), help=argparse.SUPPRESS)
    parser.add_argument("--timed", type=int, help=argparse.SUPPRESS)  # with --child: time N images in process
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# The material: the ViT-B/16 folders and the two sets of images


def _cifar_dir(args: argparse.Namespace) -> Path:
    if args.cifar:
        return Path(args.cifar)
    return Path(os.environ.get("VIT_HF_SHARED", REPO.parent / "shared")) / "data" / "cifar10"


def _cifar_rows(args: argparse.Namespace) -> list[dict]:
    import pyarrow.parquet as pq

    path = _cifar_dir(args) / "test.parquet"
    if not path.is_file():
        sys.exit(f"error: {path}: no CIFAR-10 test parquet (give --cifar)")
    return pq.read_table(path).slice(0, args.images).to_pylist()


def make_images(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The folders of the two sets: JPEG photos of 300-640 px and CIFAR-10 test images, written once."""
    from PIL import Image

    folders = {"photos": Path(args.photos) if args.photos else work / "photos", "cifar": work / "cifar"}
    rows = None
    if not args.photos and len(list(folders["photos"].glob("*.jpg"))) != args.images:
        rows = _cifar_rows(args)
        folders["photos"].mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        for i, row in enumerate(rows):
            size = rng.randint(300, 640), rng.randint(300, 640)
            image = Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB").resize(size, Image.BICUBIC)
            image.save(folders["photos"] / f"{i:03d}.jpg", quality=90)
    if len(list(folders["cifar"].glob("*.png"))) != args.images:
        folders["cifar"].mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows or _cifar_rows(args)):
            (folders["cifar"] / f"{i:03d}.png").write_bytes(row["img"]["bytes"])  # the stored PNGs, as they are
    return folders


def make_models(work: Path) -> None:
    """A randomly initialised ViT-B/16 model folder (224 px, 10 classes) and its fp32 and int8 ONNX exports."""
    model_dir = work / FOLDERS["torch-fp32"]
    if not (model_dir / "model.safetensors").is_file():
        import torch
        from transformers import ViTConfig, ViTForImageClassification

        from vit_hf.publish.model_dir import save_model_dir

        torch.manual_seed(0)
        config = ViTConfig(image_size=224, patch_size=16, num_labels=10, id2label=dict(enumerate(CIFAR10_CLASSES)))
        save_model_dir(ViTForImageClassification(config).eval(), model_dir)
    for case, extra in (("onnx-fp32", []), ("onnx-int8", ["--quantize", "int8"])):
        if not (work / FOLDERS[case] / "model.onnx").is_file():
            command = [sys.executable, "-m", "vit_hf.onnx", str(model_dir), str(work / FOLDERS[case]), *extra]
            subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------------------------------------
# One case: classify every image of a folder (the child process)


def _classifier(case: str, model_dir: Path, batch_size: int):
    """A function from image paths to their JSON lines, for CASE, its model loaded."""
    if case == "pipeline":
        from transformers import pipeline

        classifier = pipeline("image-classification", model=str(model_dir), device="cpu")

        def classify(paths):
            answers = classifier([str(path) for path in paths], batch_size=batch_size, top_k=5)
            return [{"image": str(path), "predictions": answer} for path, answer in zip(paths, answers, strict=True)]

        return classify
    from vit_hf.serving.classify import classify_paths
    from vit_hf.serving.preprocess import Preprocessing

    if case.startswith("torch"):
        from vit_hf.serving.torch_backend import TorchBackend

        backend = TorchBackend(model_dir, bf16=case == "torch-bf16")
    else:
        from vit_hf.serving.onnx_backend import OnnxBackend

        backend = OnnxBackend(model_dir)
    preprocessing = Preprocessing.from_folder(model_dir)
    return lambda paths: list(classify_paths(backend, preprocessing, paths, 5, batch_size))


def run_child(args: argparse.Namespace) -> None:
    """--child CASE MODEL_DIR IMAGES: print the JSON lines of every image; with --timed N, instead warm up on one
    batch and print the images/s of classifying the first N."""
    case, model_dir, images = args.child
    from transformers.utils.logging import disable_progress_bar

    from vit_hf.data.images import image_paths

    disable_progress_bar()
    paths = image_paths([images])  # as predict finds them
    classify = _classifier(case, Path(model_dir), args.batch_size)
    if args.timed is None:
        for line in classify(paths):
            print(json.dumps(line))
        return
    classify(paths[: args.batch_size])
    start = time.perf_counter()
    lines = classify(paths[: args.timed])
    print(json.dumps({"images": len(lines), "seconds": time.perf_counter() - start}))


# ----------------------------------------------------------------------------------------------------------
# The measures, interleaved


def _command(case: str, work: Path, images: Path, args: argparse.Namespace, timed: int | None) -> list[str]:
    folder = work / FOLDERS[case]
    if timed is None and case in ("torch-fp32", "onnx-fp32", "onnx-int8"):
        return [sys.executable, "-m", "vit_hf.predict", str(folder), str(images), "--batch-size", str(args.batch_size)]
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, str(folder), str(images),
               "--batch-size", str(args.batch_size)]  # fmt: skip
    return command + (["--timed", str(timed)] if timed else [])


def measure(case: str, work: Path, images: Path, args: argparse.Namespace, measure_name: str) -> float:
    """Images/s of one run of CASE over IMAGES: the whole process timed from outside, or the child's own timing."""
    timed = args.in_process_images if measure_name == "in-process" else None
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(_command(case, work, images, args, timed), cwd=REPO, capture_output=True, text=True,
                          env=environment)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {case} on {images} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if timed:
        return lines[-1]["images"] / lines[-1]["seconds"]
    from vit_hf.data.images import image_paths

    if len(lines) != len(image_paths([images])) or not all("predictions" in line for line in lines):
        sys.exit(f"error: {case} on {images} printed {len(lines)} lines, not one per image")
    return len(lines) / seconds


def run_all(args: argparse.Namespace, work: Path, folders: dict[str, Path]) -> dict[tuple, list[float]]:
    """Every (set, measure, case) run --repeats times, the cases alternating in a rotating order within a repeat."""
    results: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats):
        for set_name in args.sets:
            for measure_name in args.measures:
                order = args.cases[repeat % len(args.cases) :] + args.cases[: repeat % len(args.cases)]
                for case in order:
                    rate = measure(case, work, folders[set_name], args, measure_name)
                    results.setdefault((set_name, measure_name, case), []).append(rate)
                    print(f"repeat {repeat + 1}: {set_name:6} {measure_name:10} {case:10} {rate:6.2f} img/s",
                          file=sys.stderr, flush=True)  # fmt: skip
    return results


def _ratios(results: dict[tuple, list[float]]) -> dict[tuple, float | None]:
    """Per (set, measure, case): the median over repeats of its rate over pipeline()'s in the same repeat (minutes
    apart, under the same load from other work), or None without a pipeline() run."""
    ratios = {}
    for (set_name, measure_name, case), rates in results.items():
        baseline = results.get((set_name, measure_name, "pipeline"))
        ratios[(set_name, measure_name, case)] = (
            statistics.median(rate / base for rate, base in zip(rates, baseline, strict=True)) if baseline else None
        )
    return ratios


def report(results: dict[tuple, list[float]], args: argparse.Namespace) -> None:
    """A JSON line per (set, measure, case): median images/s, every repeat, ratio to pipeline(); then the table."""
    medians = {key: statistics.median(rates) for key, rates in results.items()}
    ratios = _ratios(results)
    for (set_name, measure_name, case), rates in results.items():
        key = (set_name, measure_name, case)
        line = {"set": set_name, "measure": measure_name, "case": case, "images_per_second": medians[key],
                "repeats": rates, "batch_size": args.batch_size, "vs_pipeline": ratios[key]}  # fmt: skip
        print(json.dumps(line))
    columns = [(s, m) for s in args.sets for m in args.measures]
    print("\n| case | " + " | ".join(f"{s}, {m}" for s, m in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for case in args.cases:
        cells = []
        for set_name, measure_name in columns:
            key = (set_name, measure_name, case)
            cells.append(f"{medians[key]:.2f} img/s" + (f" ({ratios[key]:.2f}x)" if ratios[key] else ""))
        print(f"| {case} | " + " | ".join(cells) + " |")


def machine() -> dict:
    """What the figures were measured on."""
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": os.cpu_count(), "load": os.getloadavg(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}  # fmt: skip


def accuracy(args: argparse.Namespace, work: Path) -> None:
    """Export --accuracy's model to int8 on --recipe's eval split and print the figures the export measured."""
    if not args.recipe:
        sys.exit("error: --accuracy needs --recipe (its eval split is measured on)")
    out = work / "accuracy-int8"
    command = [sys.executable, "-m", "vit_hf.onnx", args.accuracy, str(out), "--quantize", "int8",
               "--recipe", args.recipe, *(["--split", args.split] if args.split else [])]  # fmt: skip
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    figures = json.loads((out / "onnx_export.json").read_text())["int8"]
    print(json.dumps({"model": args.accuracy, **figures}))
    lost = figures["accuracy_points_lost"]
    print(f"{figures['inputs']}: fp32 {figures['accuracy_fp32']:.2%}, int8 {figures['accuracy_int8']:.2%} "
          f"({lost:+.2f} points lost), top-1 agreement {figures['top1_agreement']:.2%}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.child:
        return run_child(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.accuracy:
        return accuracy(args, work)
    folders = make_images(args, work)
    make_models(work)
    print(json.dumps({"machine": machine(), "images": args.images, "in_process_images": args.in_process_images}))
    report(run_all(args, work, folders), args)
    print(json.dumps({"load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
