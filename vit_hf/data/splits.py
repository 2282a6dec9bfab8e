"""Split expressions: `train[:98%]+test` cut from a data set read whole, and the absolute rows a stream can take.

A percentage or row range of a split read whole is cut from a seeded permutation of the split's rows, stratified by
class (`RowOrder`), not from the stored order: an image folder is stored class by class, so its last 2% would be
one class. The permutation depends on the rows' labels and data.split_seed only, so every run and every process
count cuts the same rows, and complementary slices (`train[:98%]`, `train[98%:]`) share none and miss none.
"""

import re
import zlib
from typing import TYPE_CHECKING

import numpy as np

from vit_hf.data.messages import one_line
from vit_hf.utils.errors import UserError

if TYPE_CHECKING:
    import datasets

_PART = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*([^\]:]*?)\s*:\s*([^\]]*?)\s*\])?\s*$")


def parse_split(expression: str, field: str) -> list[tuple[str, int, int | None]]:
    """(split, start, stop) of each part of a streamable split expression; a one-line UserError naming FIELD."""
    parts = []
    for text in expression.split("+"):
        match = _PART.match(text)
        bounds = match.groups()[1:] if match else ()
        if not match or not all(bound in (None, "") or bound.isdigit() for bound in bounds):
            raise UserError(
                f"{field}: {expression!r} cannot stream: with data.streaming a split is a split name or absolute "
                "rows (train, train[:1000], train[1000:], train[500:1500], joined with +); percentages and "
                "negative rows need the split's length"
            )
        name, start, stop = match.group(1), match.group(2) or "0", match.group(3)
        start, stop = int(start), int(stop) if stop else None
        if stop is not None and stop <= start:
            raise UserError(f"{field}: {expression!r} is empty ({name}[{start}:{stop}])")
        parts.append((name, start, stop))
    return parts


def stratified_order(labels: np.ndarray, seed: int, salt: str = "") -> np.ndarray:
    """A permutation of the rows in which each class is spread evenly: any stretch of it holds each class in about
    its share of the whole (a prefix, within one row).

    Each class's rows are shuffled and dealt at even spacing over [0, 1) (row i of a class of n at (i + 1/2) / n);
    the rows are then taken in the order of those positions, ties in a random order. SALT (the split's name) gives
    each split its own draw.
    """
    entropy = [seed % 2**64, zlib.crc32(salt.encode())]  # SeedSequence takes non-negative entropy only
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    _, classes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    by_class = np.lexsort((rng.random(len(labels)), classes))  # grouped by class, shuffled within each
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(labels))
    rank[by_class] = np.arange(len(labels)) - starts[classes[by_class]]
    position = (rank + 0.5) / counts[classes]
    return np.lexsort((rng.random(len(labels)), position))


class RowOrder:
    """The order slices of a split are cut from: stored, or the split's `stratified_order` by LABEL_COLUMN."""

    def __init__(self, order: str = "stored", seed: int = 0, label_column: str | None = None) -> None:
        self.order, self.seed, self.label_column = order, seed, label_column
        self._cache: dict[str, np.ndarray] = {}  # the train split's permutation serves train_split and eval_split

    def rows(self, split: str, dataset: "datasets.Dataset", start: int, stop: int) -> range | np.ndarray:
        """The rows START:STOP of SPLIT (DATASET) in this order, in stored order within the slice."""
        if self.order == "stored" or (start, stop) == (0, len(dataset)):
            return range(start, stop)
        if split not in self._cache:
            import pyarrow.compute as pc

            labels = pc.fill_null(dataset.with_format("arrow")[self.label_column], -1).to_numpy()
            self._cache[split] = stratified_order(labels, self.seed, split)
        # Stored order within the slice: reads stay near each other, and the loader shuffles for training anyway.
        return np.sort(self._cache[split][start:stop])


def select_split(
    source: "datasets.DatasetDict", expression: str, name: str, field: str, order: RowOrder | None = None
) -> "datasets.Dataset":
    """The rows of a datasets split expression (`train[:98%]`, `train[:5000]+test`): load_dataset's `split` with
    ORDER's rows (default: stored, as load_dataset's); the result's `split` is the expression, as load_dataset's."""
    import datasets  # here, not above: the recipe's checks import this module, and datasets is slow to import

    order = order or RowOrder()
    try:
        instructions = datasets.ReadInstruction.from_spec(expression).to_absolute(
            {split: len(dataset) for split, dataset in source.items()}
        )
    except ValueError as error:
        raise UserError(f"data set {name!r}, {field} {expression!r}: {one_line(error)}") from error
    parts = [
        source[part.splitname].select(order.rows(part.splitname, source[part.splitname], part.from_, part.to))
        for part in instructions
        if part.to > part.from_
    ]
    if not parts:
        raise UserError(f"data set {name!r}, {field} {expression!r} is empty")
    return datasets.concatenate_datasets(parts, split=datasets.NamedSplit(expression))
