"""The image and label columns of a data set, its class names, and the checks and draws its labels need."""

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vit_hf.data.messages import listed
from vit_hf.utils.errors import UserError

# Integer label columns taken when no column is a ClassLabel: webdataset's class index is its `.cls` file.
INTEGER_LABEL_COLUMNS = ("label", "labels", "cls", "fine_label")


def find_columns(
    source: datasets.DatasetDict | datasets.IterableDatasetDict, data: dict, name: str, streaming: bool = False
) -> tuple[str, str, list[str]]:
    """The image and label columns (found by feature type unless named) and the class names (data.class_names, the
    ClassLabel's, or for integer labels of a split read whole the numbers 0..max)."""
    features = next(iter(source.values())).features
    columns = ", ".join(features)
    image_column, label_column, names = data["image_column"], data["label_column"], data["class_names"]
    for column in (image_column, label_column):
        if column is not None and column not in features:
            raise UserError(f"data set {name!r} has no column {column!r} (columns: {columns})")
    if image_column is None:
        image_column = next((column for column, kind in features.items() if isinstance(kind, datasets.Image)), None)
        if image_column is None:
            raise UserError(f"data set {name!r} has no Image column (columns: {columns}); name one in image_column")
    elif not isinstance(features[image_column], datasets.Image):
        raise UserError(f"column {image_column!r} of data set {name!r} is not an Image: {features[image_column]}")
    label_column = label_column or _label_column(features, name)
    label = features[label_column]
    if isinstance(label, datasets.ClassLabel):
        if names is not None and len(names) != label.num_classes:
            raise UserError(
                f"data.class_names: {len(names)} names, but column {label_column!r} of data set {name!r} has "
                f"{label.num_classes} classes ({listed(label.names)})"
            )
        return image_column, label_column, list(names or label.names)
    if not (isinstance(label, datasets.Value) and pa.types.is_integer(label.pa_type)):
        raise UserError(f"label column {label_column!r} of data set {name!r} is {label}, not a ClassLabel or integer")
    if names is not None:
        return image_column, label_column, list(names)
    if streaming:
        raise UserError(
            f"data.class_names: column {label_column!r} of the stream of {name!r} holds integers, not a ClassLabel, "
            "and a stream cannot be read whole to count its classes: list them in data.class_names"
        )
    # Integer labels without names: classes 0..max over all splits, named by their numbers.
    largest = max(pc.max(dataset.with_format("arrow")[label_column]).as_py() or 0 for dataset in source.values())
    return image_column, label_column, [str(i) for i in range(largest + 1)]


def _label_column(features: datasets.Features, name: str) -> str:
    """The label column of a data set that names none: a ClassLabel (label, then fine_label, first), else an
    integer column of a conventional name."""
    class_labels = [column for column, kind in features.items() if isinstance(kind, datasets.ClassLabel)]
    preferred = [column for column in ("label", "fine_label") if column in class_labels] + class_labels
    integers = [
        column
        for column in INTEGER_LABEL_COLUMNS
        if isinstance(features.get(column), datasets.Value) and pa.types.is_integer(features[column].pa_type)
    ]
    if not preferred + integers:
        raise UserError(
            f"data set {name!r} has no ClassLabel column and no integer {' / '.join(INTEGER_LABEL_COLUMNS)} column "
            f"(columns: {', '.join(features)}); name one in label_column"
        )
    return (preferred + integers)[0]


def check_labels(dataset: datasets.Dataset, column: str, num_classes: int, where: str) -> None:
    """Fail on the first missing label or label outside 0..num_classes-1."""
    labels = dataset.with_format("arrow")[column]
    values = pc.fill_null(labels, -1).to_numpy()
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise UserError(
            f"data set {where}: row {row} has label {labels[row].as_py()} in column {column!r}, "
            f"outside 0..{num_classes - 1}"
        )


def class_balanced(
    dataset: datasets.Dataset, column: str, class_names: list[str], per_class: int, seed: int, where: str
) -> datasets.Dataset:
    """PER_CLASS rows of each class, drawn without replacement by a generator seeded with SEED, in split order."""
    labels = dataset.with_format("arrow")[column].to_numpy()
    rng = np.random.default_rng(seed % 2**64)  # numpy takes non-negative seeds only
    chosen = []
    for label, class_name in enumerate(class_names):
        rows = np.flatnonzero(labels == label)
        if len(rows) < per_class:
            raise UserError(
                f"data.examples_per_class: {per_class} asked, but class {class_name!r} has {len(rows)} rows in {where}"
            )
        chosen.append(rng.choice(rows, per_class, replace=False))
    return dataset.select(np.sort(np.concatenate(chosen)))


def missing_classes(dataset: datasets.Dataset, column: str, num_classes: int) -> list[int]:
    """The labels of 0..num_classes-1 that no row of DATASET has."""
    return sorted(set(range(num_classes)) - set(pc.unique(dataset.with_format("arrow")[column]).to_pylist()))
