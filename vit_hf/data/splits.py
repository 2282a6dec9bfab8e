"""Split expressions: `train[:98%]+test` cut from a data set read whole, and the absolute rows a stream can take."""

import re
from typing import TYPE_CHECKING

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


def select_split(source: "datasets.DatasetDict", expression: str, name: str, field: str) -> "datasets.Dataset":
    """The rows of a datasets split expression (`train[:98%]`, `train[:5000]+test`), as load_dataset's `split`."""
    import datasets  # here, not above: the recipe's checks import this module, and datasets is slow to import

    try:
        instructions = datasets.ReadInstruction.from_spec(expression).to_absolute(
            {split: len(dataset) for split, dataset in source.items()}
        )
    except ValueError as error:
        raise UserError(f"data set {name!r}, {field} {expression!r}: {one_line(error)}") from error
    parts = [source[part.splitname].select(range(part.from_, part.to)) for part in instructions if part.to > part.from_]
    if not parts:
        raise UserError(f"data set {name!r}, {field} {expression!r} is empty")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
