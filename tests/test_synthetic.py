"""The built-in synthetic damage set: deterministic, in the dataset folder format, ARTeFACT-like labels and balance."""
import csv
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import module_folder
from labels import UserError, artefact_scheme, read_scheme
from synthetic import make_synthetic


def digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def metadata(root):
    with open(root / "metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def full_set(request, tmp_path_factory):
    with module_folder(request, tmp_path_factory, "synthetic") as base:
        root = make_synthetic(base / "set", count=64, size=96, seed=42)
        names = sorted(p.stem for p in (root / "annotations").glob("*.png"))
        masks = np.stack([np.asarray(Image.open(root / "annotations" / f"{n}.png")) for n in names])
        yield root, names, masks


def test_same_arguments_give_byte_identical_files_in_different_folders(tmp_path):
    first = make_synthetic(tmp_path / "a", count=6, size=64, seed=3)
    second = make_synthetic(tmp_path / "b", count=6, size=64, seed=3)
    assert len(digests(first)) == 6 + 6 + 2, "images, masks, metadata.csv and classes.json"
    assert digests(first) == digests(second)


def test_the_set_carries_artefacts_label_scheme_and_an_older_set_gets_it(tmp_path):
    root = make_synthetic(tmp_path / "a", count=3, size=64, seed=3)
    assert read_scheme(root / "classes.json") == artefact_scheme()
    (root / "classes.json").unlink()
    assert make_synthetic(root, count=3, size=64, seed=3) == root
    assert read_scheme(root / "classes.json") == artefact_scheme()


def test_another_seed_gives_other_images(tmp_path):
    first = digests(make_synthetic(tmp_path / "a", count=3, size=64, seed=1))
    second = digests(make_synthetic(tmp_path / "b", count=3, size=64, seed=2))
    assert all(first[k] != second[k] for k in first if k.startswith("images/"))


def test_layout_is_the_dataset_folder_format_with_metadata_for_grouped_splits(full_set):
    root, names, _ = full_set
    assert len(names) == 64
    assert names == sorted(p.stem for p in (root / "images").glob("*.png"))
    for name in names[:8]:
        image = Image.open(root / "images" / f"{name}.png")
        mask = Image.open(root / "annotations" / f"{name}.png")
        assert (image.mode, image.size) == ("RGB", (96, 96))
        assert (mask.mode, mask.size) == ("L", (96, 96))
    columns, rows = metadata(root)
    assert columns == ["id", "material", "content", "width", "height"]
    assert [row["id"] for row in rows] == names
    assert {(row["width"], row["height"]) for row in rows} == {("96", "96")}
    # Leave-one-material-out and leave-one-content-out need several groups, each of several images.
    for column in ("material", "content"):
        groups = [row[column] for row in rows]
        assert len(set(groups)) >= 3
        assert min(groups.count(g) for g in set(groups)) >= 8


def test_masks_hold_only_class_ids_and_the_ignore_label(full_set):
    _, _, masks = full_set
    assert set(np.unique(masks).tolist()) <= set(range(16)) | {255}


def test_every_class_appears_in_several_images(full_set):
    _, _, masks = full_set
    images_per_class = [sum(np.any(m == c) for m in masks) for c in range(16)]
    assert images_per_class[0] == 64
    # Enough images per damage class that a 3-fold validation split usually contains each one.
    assert min(images_per_class[1:]) >= 5, images_per_class


def test_clean_dominates_the_labelled_pixels_as_in_artefact(full_set):
    _, _, masks = full_set
    counts = np.bincount(masks[masks != 255].ravel(), minlength=16)
    assert 0.80 <= counts[0] / counts.sum() <= 0.92
    assert counts[1:].min() > 0


def test_some_but_not_all_images_show_a_backdrop_around_the_artwork(full_set):
    _, _, masks = full_set
    bordered = [m for m in masks if np.any(m == 255)]
    assert 0 < len(bordered) < len(masks)
    for m in bordered:
        edges = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
        assert np.all(edges == 255)
        assert np.mean(m != 255) > 0.3


def test_a_finished_set_is_reused_untouched(tmp_path):
    root = make_synthetic(tmp_path / "set", count=4, size=64)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert make_synthetic(root, count=4, size=64) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_concurrent_callers_end_with_one_complete_set_and_no_leftovers(tmp_path):
    reference = digests(make_synthetic(tmp_path / "reference", count=5, size=64, seed=9))
    with ThreadPoolExecutor(3) as pool:
        roots = list(pool.map(lambda _: make_synthetic(tmp_path / "shared", count=5, size=64, seed=9), range(3)))
    assert roots == [tmp_path / "shared"] * 3
    assert digests(tmp_path / "shared") == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "shared"]


def test_a_folder_holding_something_else_is_refused_not_mixed_in(tmp_path):
    make_synthetic(tmp_path / "set", count=4, size=64)
    with pytest.raises(UserError, match="delete it"):
        make_synthetic(tmp_path / "set", count=5, size=64)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other"):
        make_synthetic(tmp_path / "other", count=4, size=64)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_generation_prints_plain_progress_lines_on_the_main_process_only(tmp_path, capsys, monkeypatch):
    make_synthetic(tmp_path / "set", count=3, size=64)
    assert capsys.readouterr().err == "synthetic set set: images 3/3, ETA 0:00:00\n"
    monkeypatch.setenv("RANK", "1")
    make_synthetic(tmp_path / "other", count=3, size=64)
    assert capsys.readouterr().err == ""
