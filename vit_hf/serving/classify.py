"""Image files to top-k predictions, batch by batch: the files read in worker threads while the model runs, the
softmax and the ranking done for a whole batch at once."""

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from vit_hf.serving.backends import Backend
from vit_hf.serving.preprocess import Preprocessing, read_batches
from vit_hf.utils.errors import UserError


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best classes of each row of LOGITS, best first, and their softmax probabilities: (B, k) each."""
    logits = logits.astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    # A stable sort: ties keep class order, as torch.topk does on the CPU.
    indices = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return indices, np.take_along_axis(probabilities, indices, axis=-1)


def classify_paths(
    backend: Backend,
    preprocessing: Preprocessing,
    paths: Sequence[Path],
    k: int = 5,
    batch_size: int = 32,
    skip_bad: bool = False,
    workers: int | None = None,
) -> Iterator[dict]:
    """Yield {"image": path, "predictions": [{"label", "score"}, ...]} per path, in order, the k best first.

    A file that cannot be read stops the run with its one-line UserError, or with SKIP_BAD is reported on its own
    line, {"image": path, "error": why}, and the run goes on.
    """
    k = min(k, len(backend.labels))
    for batch in read_batches(paths, preprocessing.read, batch_size, workers):
        images = [image for _, image in batch if not isinstance(image, UserError)]
        if images:
            indices, scores = top_k(backend.logits(preprocessing.pixel_values(images)), k)
        row = 0
        for path, image in batch:
            if isinstance(image, UserError):
                if not skip_bad:
                    raise image
                yield {"image": str(path), "error": str(image).removeprefix(f"{path}: ")}
                continue
            scored = zip(indices[row].tolist(), scores[row].tolist(), strict=True)
            yield {"image": str(path), "predictions": [{"label": backend.labels[i], "score": p} for i, p in scored]}
            row += 1
