"""splits.py: folds over source images, an inner validation split from each fold's training images, manifests
that refuse to go stale and never land in the dataset folder."""
import csv
import json

import pytest

import data
import files
import splits
from splits import Protocol
from labels import UserError, artefact_scheme, scheme_to_dict
from test_data import read_csv, write_dataset


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_kfold_test_folds_cover_every_image_once_and_train_inner_test_are_disjoint(tmp_path, folds):
    root = write_dataset(tmp_path / "ds", count=13)
    ids = {s.id for s in files.list_samples(root)}
    tests = []
    for fold in range(folds):
        train, inner, test = splits.split_ids(root, Protocol("kfold", folds), fold, tmp_path / "m.json")
        assert set(train) | set(inner) | set(test) == ids
        assert not (set(train) & set(inner) or set(train) & set(test) or set(inner) & set(test))
        assert len(inner) == round(0.15 * (len(ids) - len(test))) and inner
        tests.append(set(test))
    assert sum(map(len, tests)) == len(ids) and set().union(*tests) == ids
    assert max(map(len, tests)) - min(map(len, tests)) <= 1


def test_single_split_tests_on_a_fifth(tmp_path):
    root = write_dataset(tmp_path / "ds", count=10)
    train, inner, test = splits.split_ids(root, Protocol("single", inner_frac=0.25))
    assert (len(train), len(inner), len(test)) == (6, 2, 2)


def test_splits_are_deterministic_and_depend_on_the_seed(tmp_path):
    root = write_dataset(tmp_path / "ds", count=12)

    def folds(seed):
        return [splits.split_ids(root, Protocol("kfold", 3, seed), fold)[1:] for fold in range(3)]

    assert folds(42) == folds(42)
    assert folds(7) != folds(42)


def test_leave_one_group_out_uses_sorted_values_as_folds_and_inner_keeps_the_group_out(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=9)
    metadata = {row["id"]: row for row in read_csv(dataset / "metadata.csv")}
    for fold, material in enumerate(sorted({"Paper", "Canvas", "Glass"})):
        train, inner, test = splits.split_ids(dataset, Protocol("material"), fold)
        assert {metadata[i]["material"] for i in test} == {material}
        assert material not in {metadata[i]["material"] for i in train + inner}
    assert {metadata[i]["content"] for i in splits.split_ids(dataset, Protocol("content"), 1)[2]} == {"Line art"}
    with pytest.raises(UserError, match="--fold 3"):
        splits.split_ids(dataset, Protocol("material"), 3)


def test_group_split_without_the_metadata_column_is_a_user_error(tmp_path):
    dataset = write_dataset(tmp_path / "ds")
    (dataset / "metadata.csv").write_text("id,width\n" + "".join(f"img{i:02d},40\n" for i in range(6)))
    with pytest.raises(UserError, match="material"):
        splits.split_ids(dataset, Protocol("material"))
    (dataset / "metadata.csv").unlink()
    with pytest.raises(UserError, match="metadata.csv"):
        splits.split_ids(dataset, Protocol("content"))


def set_material(dataset, sample_id, material):
    rows = read_csv(dataset / "metadata.csv")
    for row in rows:
        if row["id"] == sample_id:
            row["material"] = material
    with open(dataset / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("change, words", [
    ("material", "material of img03 Paper -> Glass"),
    ("image", "new image extra"),
    ("inner", "inner_frac 0.15 -> 0.3"),
])
def test_a_manifest_refuses_when_what_it_depends_on_changed(tmp_path, change, words):
    dataset = write_dataset(tmp_path / "ds", count=9)
    manifest = tmp_path / "splits" / "m.json"
    first = splits.split_ids(dataset, Protocol("material"), 0, manifest)
    assert manifest.is_file() and splits.split_ids(dataset, Protocol("material"), 0, manifest) == first
    inner_frac = 0.15
    if change == "material":
        set_material(dataset, "img03", "Glass")
    elif change == "image":
        write_dataset(tmp_path / "more", count=1)
        (dataset / "images" / "extra.png").write_bytes((tmp_path / "more" / "images" / "img00.png").read_bytes())
        (dataset / "annotations" / "extra.png").write_bytes(
            (tmp_path / "more" / "annotations" / "img00.png").read_bytes())
        with open(dataset / "metadata.csv", "a") as f:
            f.write("extra,Paper,Line art\n")
    else:
        inner_frac = 0.3
    with pytest.raises(UserError) as raised:
        splits.split_ids(dataset, Protocol("material", inner_frac=inner_frac), 0, manifest)
    assert str(manifest) in str(raised.value) and words in str(raised.value) and "re-split" in str(raised.value)


def test_manifest_stores_what_the_split_depends_on(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=9)
    splits.split_ids(dataset, Protocol("content"), 0, tmp_path / "m.json")
    stored = json.loads((tmp_path / "m.json").read_text())
    assert {"scheme", "folds", "seed", "inner_frac", "ids", "groups", "test", "inner"} <= set(stored)
    assert stored["groups"]["img00"] == "Line art" and len(stored["test"]) == len(stored["inner"]) == 2


def test_the_default_manifest_goes_beside_the_run_never_into_the_dataset_and_one_per_inner_frac(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=9)
    before = sorted(p.name for p in dataset.rglob("*"))
    cfg = {"data": str(dataset), "synthetic_count": 0, "synthetic_size": 0, "split": "kfold", "fold": 0, "folds": 3,
           "seed": 42, "inner_frac": 0.15, "select": "inner", "splits": None, "run_dir": str(tmp_path / "runs" / "a"),
           "img_size": 32, "work_size": 0, "preload": "none", "offline_aug": False,
           "classes": scheme_to_dict(artefact_scheme())}
    parts = data.load_split(cfg, needed=("train", "val", "test"))
    assert sorted(p.name for p in dataset.rglob("*")) == before
    assert len(list((tmp_path / "runs" / "splits").glob("ds-*-kfold-3-42.json"))) == 1
    assert [len(parts[k].samples) for k in ("train", "val", "test")] == [5, 1, 3]
    last = data.load_split(dict(cfg, select="last"), needed=("train", "val", "test"))
    assert [len(last[k].samples) for k in ("train", "val", "test")] == [6, 0, 3]
    assert parts["test"].groups["material"] == [data.read_metadata(dataset)[s.id]["material"]
                                                 for s in parts["test"].samples]
    # Another --inner-frac gets a manifest of its own beside the first, with the same test folds.
    wider = data.load_split(dict(cfg, inner_frac=0.4), needed=("train", "val", "test"))
    assert [p.name for p in (tmp_path / "runs" / "splits").glob("ds-*-kfold-3-42-inner0.4.json")] != []
    assert [s.id for s in wider["test"].samples] == [s.id for s in parts["test"].samples]
    assert [len(wider[k].samples) for k in ("train", "val", "test")] == [4, 2, 3]
