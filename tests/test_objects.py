"""The object and the truth, separately: --object masks (black outside, one other value on the object), the
image's alpha channel, --truth id masks scored with IoU; and one prediction for evaluation and predict.py, down
to the padding of images thinner than a tile."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
from distributed import Run
import evaluation
import files
import preload
from conftest import module_folder, run_script
from metrics import confusion
from predict import load_model, main
from test_predict import ARTEFACT, CLASS_NAMES, random_image, write_checkpoint
from tiles import Tiling, predict_image


@pytest.fixture(scope="module")
def varied(request, tmp_path_factory):
    with module_folder(request, tmp_path_factory, "varied") as base:
        yield write_checkpoint(base, work_size=96, varied=True)


def one_error(capsys, argv):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_white_on_black_object_mask_makes_the_white_pixels_the_object(tmp_path, varied):
    (tmp_path / "in").mkdir()
    (tmp_path / "obj").mkdir()
    Image.fromarray(random_image(60, 80)).save(tmp_path / "in" / "panel.png")
    mask = np.zeros((60, 80), np.uint8)
    mask[10:50, 20:70] = 255
    Image.fromarray(mask).save(tmp_path / "obj" / "panel.png")
    assert main([str(a) for a in ["--checkpoint", varied, tmp_path / "in", "--out", tmp_path / "out",
                                  "--object", tmp_path / "obj"]]) == 0
    labels = np.asarray(Image.open(tmp_path / "out" / "panel_mask.png"))
    assert ((labels == 255) == (mask == 0)).all() and labels[mask == 255].max() < 16
    report = json.loads((tmp_path / "out" / "panel_report.json").read_text())
    assert report["object_pixels"] == 40 * 50 and report["object_source"] == f"--object {tmp_path / 'obj' / 'panel.png'}"
    assert sum(c["pixels"] for c in report["classes"]) == 40 * 50
    row = next(csv.DictReader(open(tmp_path / "out" / "areas.csv", encoding="utf-8")))
    assert row["object_source"] == report["object_source"] and int(row["object_pixels"]) == 2000


@pytest.mark.parametrize("values,size,words", [
    ((0, 128, 255), (60, 80), "grey values 0, 128, 255"),
    ((128, 255), (60, 80), "grey values 128, 255"),
    ((0,), (60, 80), "black everywhere"),
    ((0, 255), (61, 80), "80x61 (WxH) but its image is 80x60"),
])
def test_object_masks_that_could_mean_two_things_are_refused_in_one_line(tmp_path, capsys, varied, values, size, words):
    (tmp_path / "obj").mkdir()
    Image.fromarray(random_image(60, 80)).save(tmp_path / "panel.png")
    mask = np.full(size, values[0], np.uint8)
    for i, value in enumerate(values[1:], 1):
        mask[:, 20 * i:] = value
    Image.fromarray(mask).save(tmp_path / "obj" / "panel.png")
    err = one_error(capsys, ["--checkpoint", varied, tmp_path / "panel.png", "--out", tmp_path / "out",
                             "--object", tmp_path / "obj"])
    assert str(tmp_path / "obj" / "panel.png") in err and words in err
    assert not (tmp_path / "out" / "panel_mask.png").exists(), "no half-made map is left behind"


def test_an_images_alpha_channel_is_its_object_unless_an_object_mask_is_given(tmp_path, varied):
    rgba = np.concatenate([random_image(50, 60), np.zeros((50, 60, 1), np.uint8)], axis=2)
    rgba[5:45, 10:40, 3] = 255
    rgba[20:30, 40:50, 3] = 40  # half transparent still belongs to the object
    (tmp_path / "in").mkdir()
    Image.fromarray(rgba).save(tmp_path / "in" / "logo.png")
    assert main([str(a) for a in ["--checkpoint", varied, tmp_path / "in", "--out", tmp_path / "a"]]) == 0
    labels = np.asarray(Image.open(tmp_path / "a" / "logo_mask.png"))
    np.testing.assert_array_equal(labels == 255, rgba[..., 3] == 0)
    report = json.loads((tmp_path / "a" / "logo_report.json").read_text())
    assert report["object_pixels"] == int((rgba[..., 3] > 0).sum()) and report["object_source"].startswith("alpha")

    (tmp_path / "obj").mkdir()
    mask = np.zeros((50, 60), np.uint8)
    mask[:25] = 1
    Image.fromarray(mask).save(tmp_path / "obj" / "logo.png")
    assert main([str(a) for a in ["--checkpoint", varied, tmp_path / "in", "--out", tmp_path / "b", "--object",
                                  tmp_path / "obj"]]) == 0
    labels = np.asarray(Image.open(tmp_path / "b" / "logo_mask.png"))
    np.testing.assert_array_equal(labels == 255, mask == 0)


def brute_iou(labels, truth, k):
    scored = truth != 255
    union = (((labels == k) | (truth == k)) & scored).sum()
    return None if union == 0 else ((labels == k) & (truth == k) & scored).sum() / union


def test_truth_masks_are_scored_with_iou_and_their_ignore_id_bounds_the_object(tmp_path, varied):
    (tmp_path / "in").mkdir()
    (tmp_path / "truth").mkdir()
    image = random_image(70, 90)
    image[:35] //= 3
    Image.fromarray(image).save(tmp_path / "in" / "scroll.png")
    truth = np.random.default_rng(1).choice([0, 0, 0, 7, 9, 15], (70, 90)).astype(np.uint8)
    truth[:, :12] = 255
    Image.fromarray(truth).save(tmp_path / "truth" / "scroll.png")
    assert main([str(a) for a in ["--checkpoint", varied, tmp_path / "in", "--out", tmp_path / "out", "--truth",
                                  tmp_path / "truth"]]) == 0
    labels = np.asarray(Image.open(tmp_path / "out" / "scroll_mask.png"))
    np.testing.assert_array_equal(labels == 255, truth == 255)
    report = json.loads((tmp_path / "out" / "scroll_report.json").read_text())
    assert report["object_source"].startswith("--truth") and report["scored_pixels"] == int((truth != 255).sum())
    row = next(csv.DictReader(open(tmp_path / "out" / "scores.csv", encoding="utf-8")))
    for k, name in enumerate(CLASS_NAMES):
        expected = brute_iou(labels, truth, k)
        assert (row[f"{name} IoU"] == "") if expected is None else float(row[f"{name} IoU"]) == pytest.approx(expected, abs=1e-6)
    defined = [v for v in (brute_iou(labels, truth, k) for k in range(16)) if v is not None]
    assert float(row["mIoU"]) == pytest.approx(np.mean(defined), abs=1e-5)


# Width x height; at --work-size 96 they become 96x19 (the 1,824 scored pixels), 12x96 and 96x1: every
# one thinner than the 64 px tile, so predict_image pads them.
THIN = {"band": (250, 50), "scroll": (50, 400), "strip": (3000, 10)}


@pytest.fixture(scope="module")
def thin_set(request, tmp_path_factory):
    with module_folder(request, tmp_path_factory, "thin") as base:
        root = base / "ds"
        (root / "images").mkdir(parents=True)
        (root / "annotations").mkdir()
        rng = np.random.default_rng(7)
        for name, (width, height) in THIN.items():
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image[:, : width // 2] //= 4
            Image.fromarray(image).save(root / "images" / f"{name}.png")
            truth = rng.choice([0, 0, 1, 5, 9, 255], (height, width)).astype(np.uint8)
            Image.fromarray(truth).save(root / "annotations" / f"{name}.png")
        yield root


def test_eval_full_res_and_predict_truth_give_identical_labels_on_thin_images(thin_set, varied, tmp_path):
    done = run_script("predict.py", "--checkpoint", varied, thin_set / "images", "--out", tmp_path / "out", "--truth",
                      thin_set / "annotations", "--threads", "1")
    assert done.returncode == 0, done.stderr
    samples = files.list_samples(thin_set)
    part = data.Part(samples, preload.preload(samples, preload.RowFormat(64, ARTEFACT, work_size=96), mode="disk"), {})
    cfg = {"heads": "fine", "img_size": 64, "work_size": 96, "micro_batch": 8, "precision": "fp32"}
    model = load_model(varied, torch.device("cpu"))[0]
    total = 0
    for row, sample in enumerate(samples):
        (height, width), labels = evaluation.full_res_labels(model, part, row, Run(cfg, torch.device("cpu")))
        full = files.resize_labels(labels, height, width)
        truth = np.asarray(Image.open(sample.mask))
        mapped = np.asarray(Image.open(tmp_path / "out" / f"{sample.id}_mask.png"))
        scored = truth != 255
        np.testing.assert_array_equal(mapped[scored], full[scored], err_msg=sample.id)
        total = total + np.array(json.loads((tmp_path / "out" / f"{sample.id}_report.json").read_text())["confusion"])
    cms = evaluation.evaluate_full_res(model, part, Run(cfg, torch.device("cpu")))
    np.testing.assert_array_equal(cms["fine"].numpy(), total)


def test_evaluation_at_the_working_scale_pads_thin_images_as_predict_does(thin_set, varied):
    samples = files.list_samples(thin_set)
    part = data.Part(samples, preload.preload(samples, preload.RowFormat(64, ARTEFACT, work_size=96), mode="disk"), {})
    cfg = {"heads": "fine", "img_size": 64, "work_size": 96, "micro_batch": 8, "precision": "fp32"}
    model = load_model(varied, torch.device("cpu"))[0]
    expected, changed = 0, 0
    for row, sample in enumerate(samples):
        height, width = files.scaled_shape(*files.displayed_size(sample.image), 64, 96)
        working = files.scaled_copies(sample.image, (height, width))[0]
        np.testing.assert_array_equal(part.pre.image(row)[:height, :width], working)
        labels = predict_image(model, working, Tiling(64))
        truth = part.pre.mask(row)[:height, :width]
        expected = expected + confusion(torch.from_numpy(labels.astype(np.int64)),
                                                   torch.from_numpy(truth.astype(np.int64)), 16, 255)
        # What evaluation used to predict: the preload's image, padded with black to a whole tile.
        changed += int((predict_image(model, part.pre.image(row), Tiling(64))[:height, :width] != labels).sum())
    cms = evaluation.evaluate(model, part, Run(cfg, torch.device("cpu")))
    np.testing.assert_array_equal(cms["fine"].numpy(), expected.numpy())
    assert changed > 0, "black padding changes labels, so this test can tell the two apart"
