#!/usr/bin/env bash
# The GPU check of one session with a lent GPU: each step under a timeout of its own, no network, one JSON file and
# a table.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else gpu_check/)
#
# 1. ViT-B/16 at 224 px, bf16, compiled: the loop against transformers.Trainer (images/s, MFU, peak memory).
# 2. The from-scratch recipe (RandAugment, random erasing, Mixup/CutMix) at its own shapes: the loop's images/s.
# 3. A short fp16 run with the gradient scaler; 4. a short FSDP run on one GPU; 5. host synchronisations per
#    update on CUDA with every augmentation on (torch.cuda.set_sync_debug_mode("warn") around FineTune.update).
# The data is a CIFAR-shaped parquet of random images written here: the machine has no network, and speed does not
# depend on what the pixels show. VIT_HF_GPU_CHECK_SMALL=1 shrinks every case to check the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
small=${VIT_HF_GPU_CHECK_SMALL:-0}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

python - "$out/data" <<'PY'
import io, sys
from pathlib import Path
import datasets, numpy as np
from PIL import Image
rng = np.random.default_rng(0)
names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for split, count in (("train", 6000), ("test", 1000)):
    images = []
    for pixels in rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8):
        buffer = io.BytesIO(); Image.fromarray(pixels).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    labels = rng.integers(0, 10, count).tolist()
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(out / f"{split}.parquet")
PY
data="data.dataset={\"path\": \"parquet\", \"data_files\": {\"train\": \"$out/data/train.parquet\", \"test\": \"$out/data/test.parquet\"}}"

if [ "$small" = 1 ]; then
  b16=(--model tiny --image-size 32 --micro-batch 32 --precision no --steps 10 --set train.log_every=5 --warmup 5)
  scratch=(--set model.config.num_hidden_layers=1 --set model.config.hidden_size=64 --set model.config.intermediate_size=128
           --set model.config.num_attention_heads=2 --micro-batch 32 --precision no --steps 10 --warmup 5 --set train.log_every=5)
  short=("model.config={\"hidden_size\": 64, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"intermediate_size\": 128, \"patch_size\": 8}"
         "model.image_size=32" "train.micro_batch_size=32" "train.global_batch_size=32")
  fp16=no
else
  b16=(--model ViT-B_16 --image-size 224 --micro-batch 256 --precision bf16 --compile --steps 30)
  scratch=(--micro-batch 512 --precision bf16 --steps 30)
  short=("model.config={\"patch_size\": 16}" "model.image_size=224" "train.micro_batch_size=128" "train.global_batch_size=128")
  fp16=fp16
fi
common=("$data" "data.train_split=train" "data.eval_split=test[:500]" "data.test_split=test" "data.num_workers=4"
        "model.pretrained=null" "schedule.warmup_steps=5" "schedule.total_steps=30" "train.eval_every=30"
        "train.save_every=30" "train.log_every=10")
sets() { for s in "$@"; do printf -- '--set\n%s\n' "$s"; done; }

step() {  # name, timeout in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$out/log.txt"
  local started=$SECONDS
  timeout "$limit" "$@" >"$out/$name.out" 2>"$out/$name.err"
  local rc=$?
  echo "{\"case\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started))}" >>"$out/steps.jsonl"
  tail -n 3 "$out/$name.err" >>"$out/log.txt"
}

step bench_b16 240 python benchmarks/bench_loop.py "${b16[@]}" --compare-trainer --set "$data" --set data.train_split=train
mapfile -t scratch_sets < <(sets "$data" "data.train_split=train")
step bench_scratch 120 python benchmarks/bench_loop.py --recipe recipes/cifar10_scratch.json "${scratch[@]}" "${scratch_sets[@]}"
mapfile -t fp16_sets < <(sets "${common[@]}" "${short[@]}" "train.mixed_precision=$fp16" "output.dir=$out/fp16")
step fp16_run 120 python -m vit_hf.finetune recipes/cifar10_short.json "${fp16_sets[@]}"
mapfile -t fsdp_sets < <(sets "${common[@]}" "${short[@]}" "output.dir=$out/fsdp")
step fsdp_run 120 accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 \
  -m vit_hf.finetune recipes/cifar10_short.json "${fsdp_sets[@]}"
step host_syncs 150 python - "$out" "$data" "$small" <<'PY'
import json, sys, warnings
import torch
from tqdm import tqdm
from vit_hf.training.loop import FineTune
from vit_hf.training.signals import StopSignals
from vit_hf.recipe import load_recipe
out, data, small = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sets = [data, "data.train_split=train", "data.eval_split=null", "data.test_split=null", f"output.dir={out}/syncs",
        "train.log_every=1000", "train.save_every=1000", "schedule.total_steps=1000"]
if small:
    sets += ["model.config.num_hidden_layers=1", "train.micro_batch_size=32", "train.global_batch_size=32"]
job = FineTune(load_recipe("recipes/cifar10_scratch.json", sets))
job.bar, job.stop = tqdm(disable=True), StopSignals(job.accelerator.num_processes)
job.update()  # warm-up: first-time allocations
cuda = torch.cuda.is_available()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    for _ in range(5):
        job.update()
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
syncs = [str(w.message) for w in caught if "synchron" in str(w.message).lower()]
print(json.dumps({"device": "cuda" if cuda else "cpu", "updates": 5, "host_syncs": len(syncs), "first": syncs[:3]}))
job.stop.restore()
PY

python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = {"steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]}
for name in ("bench_b16", "bench_scratch", "host_syncs"):
    path = out / f"{name}.out"
    report[name] = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []
for name in ("fp16_run", "fsdp_run"):
    results = out / name.replace("_run", "") / "results.json"
    report[name] = json.loads(results.read_text()) if results.exists() else None
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print("| case | rc | seconds | figures |\n|---|---|---|---|")
for step in report["steps"]:
    rows = report.get(step["case"]) or []
    figures = rows if isinstance(rows, list) else {k: rows.get(k) for k in ("train_samples_per_second", "skipped_updates", "test_accuracy")}
    print(f"| {step['case']} | {step['rc']} | {step['seconds']} | {json.dumps(figures)[:300]} |")
PY
