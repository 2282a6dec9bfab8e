"""How many classes a batch of a streamed image folder holds: vit_hf's dealt shards against datasets' one shard.

    python benchmarks/stream_class_mix.py --parquet cifar10/train.parquet --images 5000

writes the first N images of a parquet file in the Hub's CIFAR schema (img, label) into class folders, streams the
folder as the loop does (data.streaming, shuffled, 2 workers, the default shuffle_buffer) and prints the distinct
classes of each batch of 64: mean, min and max, first with vit_hf's shards, then with the stream datasets gives.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from vit_hf.data import stream_loader, streaming
from vit_hf.data.sources import load_splits
from vit_hf.recipe import section_defaults


def write_folder(parquet: Path, count: int, root: Path) -> None:
    table = pq.read_table(parquet).slice(0, count).to_pydict()
    for i, (image, label) in enumerate(zip(table["img"], table["label"], strict=True)):
        folder = root / "train" / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(image["bytes"])


def classes_a_batch(root: Path, batch_size: int) -> tuple[int, list[int]]:
    data = section_defaults("data") | {"dataset": {"path": "imagefolder", "data_dir": str(root)}, "streaming": True,
                                       "train_split": "train", "eval_split": None, "test_split": None}  # fmt: skip
    splits = load_splits(data, streaming_ok=True)
    loader = stream_loader.make_stream_loader(
        splits.train, splits.image_column, splits.label_column, len(splits.class_names), batch_size,
        shuffle=True, seed=0, num_workers=2, image_size=32,
    )  # fmt: skip
    return splits.train.num_shards, [len(set(batch["labels"].tolist())) for batch in loader]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/stream_class_mix.py", description=__doc__.split("\n")[0])
    parser.add_argument("--parquet", type=Path, required=True)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        write_folder(args.parquet, args.images, Path(folder))
        dealt = classes_a_batch(Path(folder), args.batch_size)
        streaming.shard_folder_streams = lambda source, dataset: source  # datasets' own stream of the folder
        as_datasets = classes_a_batch(Path(folder), args.batch_size)
    for name, (shards, counts) in (("vit_hf", dealt), ("datasets", as_datasets)):
        print(f"{name}: {shards} shards, {len(counts)} batches, classes a batch: mean {np.mean(counts):.2f}, "
              f"min {min(counts)}, max {max(counts)}")  # fmt: skip


if __name__ == "__main__":
    main()
