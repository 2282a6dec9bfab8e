"""The augmentation preview: the loop's own training inputs as a PNG grid."""

import json

import pytest
from photos import write_photo_folder
from PIL import Image

from vit_hf.preview import main


def _recipe(cifar10_dir, tmp_path, augment) -> str:
    recipe = {
        "model": {"pretrained": None, "image_size": 48, "config": {"patch_size": 8, "num_hidden_layers": 1}},
        "data": {
            "dataset": {"path": "parquet", "data_files": {"train": str(cifar10_dir / "train.parquet")}},
            "train_split": "train[:64]",
            "eval_split": None,
            "test_split": None,
            "augment": augment,
        },
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return str(path)


def test_preview_writes_a_grid_of_the_augmented_training_images(cifar10_dir, tmp_path, capsys):
    augment = {"rand_augment": {"num_ops": 2, "magnitude": 9}, "random_erasing": 0.5, "mixup_alpha": 0.8}
    main([_recipe(cifar10_dir, tmp_path, augment), "--out", str(tmp_path / "grid.png"), "--count", "16"])
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.format == "PNG"
        # 8 images a row, 2 rows of 48 px, with 2 px gutters.
        assert grid.width > 8 * 48 and grid.height > 2 * 48
    assert "16 augmented training images" in capsys.readouterr().out


def test_the_same_seed_gives_the_same_grid(cifar10_dir, tmp_path):
    recipe = _recipe(cifar10_dir, tmp_path, {"crop_scale": [0.05, 1.0], "hflip": True})
    main([recipe, "--out", str(tmp_path / "a.png"), "--count", "8"])
    main([recipe, "--out", str(tmp_path / "b.png"), "--count", "8"])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_a_bad_output_name_is_one_line_exit_2(cifar10_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([_recipe(cifar10_dir, tmp_path, None), "--out", str(tmp_path / "grid.jpg")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'grid.jpg'}: expected a .png file name"


@pytest.mark.parametrize("streaming", [False, True])
def test_preview_reads_photo_folders_as_the_loop_does(cifar10_dir, tmp_path, capsys, streaming):
    # Mixed sizes, modes and formats, and a file that is no image, which bad_images "skip" leaves out.
    photos = write_photo_folder(tmp_path / "photos", cifar10_dir, broken=True)
    recipe = {
        "model": {"pretrained": None, "image_size": 32, "config": {"patch_size": 8, "num_hidden_layers": 1}},
        "data": {
            "dataset": {"path": "imagefolder", "data_dir": str(photos), "cache_dir": str(tmp_path / "cache")},
            "train_split": "train",
            "eval_split": None,
            "test_split": None,
            "bad_images": "skip",
            "streaming": streaming,
            "augment": {"crop_scale": [0.3, 1.0], "rand_augment": {"num_ops": 2, "magnitude": 9}},
        },
    }
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    main([str(tmp_path / "recipe.json"), "--out", str(tmp_path / "grid.png"), "--count", "16"])
    # 16 training rows, one of them the broken file.
    assert f"wrote {tmp_path / 'grid.png'}: 15 augmented training images" in capsys.readouterr().out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 8 * 32 and grid.height > 2 * 32
