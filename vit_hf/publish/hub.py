"""The upload of a fine-tuning run's output folder to the Hugging Face Hub, with a fresh model card.

`push_to_hub(output_dir, model_id)` refreshes the card and uploads the files a model repository needs.
"""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

from vit_hf.publish.card import (
    CARD,
    CURVES,
    REPORTED_SPLITS,
    public_recipe,
    public_results,
    read_run_json,
    write_model_card,
)
from vit_hf.publish.model_dir import MODEL_FILES, check_model_dir
from vit_hf.utils.errors import RunError, UserError
from vit_hf.utils.files import link_or_copy, write_json

# A model repository gets the loadable model, its card and what the card refers to; the run's checkpoints/ and
# runs/ stay local (the curves PNG shows what runs/ holds).
UPLOADED = (*MODEL_FILES, CARD, "recipe.json", "results.json", CURVES)


def files_to_upload(output_dir: str | os.PathLike) -> list[str]:
    """The files of OUTPUT_DIR a model repository gets, by name; a UserError when the model files are missing."""
    output_dir = check_model_dir(output_dir)
    return [name for name in UPLOADED if (output_dir / name).is_file()]


@contextlib.contextmanager
def published_folder(output_dir: Path, files: list[str]) -> Iterator[Path]:
    """The FILES of OUTPUT_DIR as the Hub gets them, in a temporary folder of the system's (hard links where it can):
    recipe.json and results.json without the machine's paths (`public_recipe`); the run's own stay as they are. A
    push killed mid-way leaves nothing in the run's folder."""
    with tempfile.TemporaryDirectory(prefix="vit_hf-push-") as folder:
        folder = Path(folder)
        for name in files:
            link_or_copy(output_dir / name, folder / name)
        for name, public in (("recipe.json", public_recipe), ("results.json", public_results)):
            if name in files:
                # Written to a new file renamed over the link: the run's own file is left as it is.
                write_json(folder / name, public(read_run_json(output_dir / name)))
        yield folder


def commit_message(recipe: dict, results: dict) -> str:
    """One line: the run's name, its accuracies and its length."""
    scores = [
        f"{name} accuracy {results[f'{key}_accuracy']:.2%}"
        for name, _, key in REPORTED_SPLITS
        if results.get(f"{key}_accuracy") is not None
    ]
    return f"Upload {recipe['name']}: {', '.join([*scores, str(results['step']) + ' steps'])}"


def push_to_hub(output_dir: str | os.PathLike, model_id: str, private: bool = False, token: str | None = None) -> str:
    """Write the model card, create the Hub repository if needed and upload the run's model; the commit's URL.

    The token is TOKEN, else HF_TOKEN, else the one `hf auth login` saved. PRIVATE applies to a new repository.
    """
    output_dir = Path(output_dir)
    try:
        validate_repo_id(model_id)
    except HFValidationError as error:
        raise UserError(f"model id {model_id!r}: {' '.join(str(error).split())}") from None
    token = token or get_token()
    if token is None:
        raise UserError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    write_model_card(output_dir, model_id)
    files = files_to_upload(output_dir)
    message = commit_message(read_run_json(output_dir / "recipe.json"), read_run_json(output_dir / "results.json"))
    api = HfApi(token=token)
    try:
        api.create_repo(model_id, private=private, exist_ok=True)
    except (OSError, HTTPError) as error:  # offline mode, no connection, or an HTTP error from the Hub
        raise UserError(f"could not push to the Hub repository {model_id}: {' '.join(str(error).split())}") from None
    try:
        with published_folder(output_dir, files) as folder:
            commit = api.upload_folder(
                repo_id=model_id, folder_path=folder, allow_patterns=files, commit_message=message
            )
    except (OSError, HTTPError) as error:  # the connection lost mid-way, after the Hub's own retries
        raise RunError(
            f"the upload to the Hub repository {model_id} failed mid-way ({' '.join(str(error).split())}); the local "
            f"folder {output_dir} is intact: retry with python -m vit_hf.push {output_dir} --model-id {model_id}"
        ) from None
    return commit.commit_url
