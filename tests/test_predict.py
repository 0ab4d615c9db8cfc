"""predict.py: tiled inference equals a whole-image forward, any image size, overlays, reports, memory, CLI."""
import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import ROOT, module_folder, run_script
from data import MEAN, STD
from labels import UserError, artefact_scheme, scheme_from_dict, scheme_to_dict
from areas import area_report
from overlay import render_overlay
from predict import _progress_printer, main, parse_args, write_mask
from tiles import Tiling, predict_image

ARTEFACT = artefact_scheme()
CLASS_NAMES, PALETTE, BACKGROUND_COLOUR = list(ARTEFACT.names), list(ARTEFACT.colours), ARTEFACT.ignore_colour

# Fine id -> coarse group, written out from the DESIGN.md table.
GROUP_OF_FINE = [0, 1, 1, 2, 1, 2, 2, 1, 3, 1, 2, 3, 3, 1, 1, 3]


def random_image(height, width, seed=42):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pointwise_model():
    torch.manual_seed(42)
    return nn.Conv2d(3, 16, 1)


def conv_model():
    """Two 3x3 convolutions with zero padding: translation-equivariant away from the borders it sees."""
    torch.manual_seed(42)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))


class HierarchicalStandIn(nn.Module):
    """Three 1x1 heads like model.py's heads="hierarchical"; the binary head leans towards clean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(42)
        self.fine, self.coarse, self.binary = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.binary.bias.copy_(torch.tensor([1.5, -1.5]))

    def forward(self, x):
        return {"fine": self.fine(x), "coarse": self.coarse(x), "binary": self.binary(x)}


def whole_image_input(image):
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))[None]


@torch.no_grad()
def whole_image_probs(model, image):
    return model(whole_image_input(image))[0].softmax(0)


def assert_labels_match(labels, probs):
    """labels equal argmax(probs) wherever the top two classes are not a float-rounding tie."""
    top2 = probs.topk(2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-5).numpy()
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], probs.argmax(0).numpy()[clear])


def test_image_of_exactly_one_tile_equals_plain_forward():
    model, image = conv_model(), random_image(64, 64)
    labels = predict_image(model, image, Tiling(64))
    assert_labels_match(labels, whole_image_probs(model, image))


@pytest.mark.parametrize("size", [(97, 131), (64, 200), (150, 97)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_pointwise_model_tiled_equals_whole_image(size, overlap):
    model, image = pointwise_model(), random_image(*size)
    labels = predict_image(model, image, Tiling(32, overlap=overlap, batch_size=3))
    assert_labels_match(labels, whole_image_probs(model, image))


def test_blending_hides_tile_borders_of_a_convolutional_model():
    model, image = conv_model(), random_image(160, 200)
    labels = predict_image(model, image, Tiling(48, overlap=0.5))
    whole = whole_image_probs(model, image).argmax(0).numpy()
    assert (labels == whole).mean() > 0.999


@pytest.mark.parametrize("size", [(97, 131), (1, 1), (20, 45), (63, 64), (64, 64), (65, 200), (150, 97)])
def test_output_size_equals_input_size(size):
    labels = predict_image(conv_model(), random_image(*size), Tiling(64))
    assert labels.shape == size and labels.dtype == np.uint8
    assert labels.max() < 16


def test_image_smaller_than_a_tile_matches_the_pointwise_forward():
    model, image = pointwise_model(), random_image(20, 45)
    assert_labels_match(predict_image(model, image, Tiling(64)), whole_image_probs(model, image))


def test_tta_with_a_flip_equivariant_model_equals_no_tta():
    torch.manual_seed(42)
    model = nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad():
        w = model.weight
        w.copy_(w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2))
    image = random_image(97, 131)
    plain = predict_image(model, image, Tiling(32, overlap=0.25))
    flipped = predict_image(model, image, Tiling(32, overlap=0.25, tta=True))
    assert (flipped == plain).mean() > 0.999


def test_tta_averages_the_four_flipped_predictions():
    model, image = conv_model(), random_image(48, 48)
    x = whole_image_input(image)
    views = []
    with torch.no_grad():
        for dims in [(3,), (2,), (2, 3)]:
            views.append(model(x.flip(dims)).softmax(1).flip(dims))
        views.append(model(x).softmax(1))
    expected = torch.stack(views).mean(0)[0]
    assert_labels_match(predict_image(model, image, Tiling(48, tta=True)), expected)


def test_hierarchical_model_uses_the_fine_head():
    model, image = HierarchicalStandIn(), random_image(40, 56)
    with torch.no_grad():
        fine = model(whole_image_input(image))["fine"][0].softmax(0)
    assert_labels_match(predict_image(model, image, Tiling(32)), fine)


def test_consistency_weights_fine_classes_by_their_coarse_group_and_damage_probability():
    model, image = HierarchicalStandIn(), random_image(40, 56)
    with torch.no_grad():
        out = {k: v[0].double().softmax(0) for k, v in model(whole_image_input(image)).items()}
    group = torch.tensor(GROUP_OF_FINE)
    joint = out["fine"] * out["coarse"][group] * out["binary"][(group > 0).long()]
    expected = (joint / joint.sum(0)).float()
    assert_labels_match(predict_image(model, image, Tiling(32, hierarchy=ARTEFACT)), expected)
    assert not torch.equal(expected.argmax(0), out["fine"].argmax(0))


def test_progress_counts_every_tile_once():
    calls = []
    predict_image(pointwise_model(), random_image(100, 150), Tiling(32, overlap=0.25, batch_size=4),
                  progress=lambda done, total: calls.append((done, total)))
    total = (math.ceil((100 - 32) / 24) + 1) * (math.ceil((150 - 32) / 24) + 1)
    assert calls[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


def test_tile_progress_of_a_large_image_is_plain_lines_at_most_every_10_s_and_at_the_end(capsys):
    show = _progress_printer("fresco.png")
    for done in range(1, 41):
        show(done, 40)
    assert capsys.readouterr().err == "fresco.png: tiles 40/40, ETA 0:00:00\n"


def test_the_old_batch_size_flag_still_sets_the_tiles_per_forward(tmp_path):
    assert parse_args(["x.png", "--checkpoint", "c.pt", "--out", str(tmp_path), "--batch-size", "5"]).batch_size == 5
    with pytest.raises(UserError, match="--tile-batch 0: must be at least 1"):
        parse_args(["x.png", "--checkpoint", "c.pt", "--out", str(tmp_path), "--tile-batch", "0"])


def test_mask_png_holds_ids_with_the_artefact_palette_and_overlay_blends_class_colours(tmp_path):
    image = random_image(48, 80)
    labels = np.zeros((48, 80), dtype=np.uint8)
    present = [1, 3, 5, 9, 15]
    for i, class_id in enumerate(present):
        labels[8 * i:8 * i + 8, 10:70] = class_id
    labels[40:, :] = 255
    write_mask(tmp_path / "m.png", labels, ARTEFACT)
    mask = Image.open(tmp_path / "m.png")
    assert mask.mode == "P"
    np.testing.assert_array_equal(np.array(mask), labels)
    palette = np.array(mask.getpalette()[:768]).reshape(256, 3)
    assert [tuple(palette[k]) for k in range(16)] == [tuple(c) for c in PALETTE]
    assert tuple(palette[255]) == BACKGROUND_COLOUR

    render_overlay(image, labels, area_report(labels, ARTEFACT), ARTEFACT).save(tmp_path / "o.png")
    overlay = np.array(Image.open(tmp_path / "o.png").convert("RGB"))
    assert overlay.shape[1] >= 80 and overlay.shape[0] > 48
    top, legend = overlay[:48, :80], overlay[48:]
    colours = np.array(PALETTE + [BACKGROUND_COLOUR] * 240, dtype=np.float64)
    padded = np.pad(labels, 1, mode="edge")
    border = ((padded[:-2, 1:-1] != labels) | (padded[2:, 1:-1] != labels) | (padded[1:-1, :-2] != labels)
              | (padded[1:-1, 2:] != labels))
    for class_id in [0, *present, 255]:
        where = (labels == class_id) & ~(border & (class_id not in (0, 255)))
        expected = image[where] if class_id == 0 else np.rint(0.5 * image[where] + 0.5 * colours[class_id])
        np.testing.assert_array_equal(top[where], expected)
        if class_id in present:
            np.testing.assert_array_equal(top[(labels == class_id) & border], colours[class_id][None].repeat(
                ((labels == class_id) & border).sum(), 0))
    swatches = {tuple(c) for c in legend.reshape(-1, 3)}
    assert all(tuple(PALETTE[k]) in swatches for k in present) and BACKGROUND_COLOUR in swatches
    assert not any(tuple(PALETTE[k]) in swatches for k in (2, 4, 6, 7, 8, 10, 11, 12, 13, 14))


def test_area_report_counts_object_pixels_and_iou_against_the_mask():
    rng = np.random.default_rng(42)
    truth = rng.choice([0, 0, 0, 1, 2, 7, 255], size=(30, 40)).astype(np.uint8)
    labels = rng.choice([0, 0, 1, 2, 9], size=(30, 40)).astype(np.uint8)
    labels[truth == 255] = 255
    report = area_report(labels, ARTEFACT, truth)
    inside = truth != 255
    assert report["object_pixels"] == inside.sum()
    for entry in report["classes"]:
        k = entry["id"]
        assert entry["name"] == CLASS_NAMES[k]
        assert entry["pixels"] == ((labels == k) & inside).sum()
        assert entry["percent"] == pytest.approx(100 * entry["pixels"] / inside.sum(), abs=1e-4)
        union = (((labels == k) | (truth == k)) & inside).sum()
        if union:
            assert entry["iou"] == pytest.approx(((labels == k) & (truth == k)).sum() / union, abs=1e-6)
        else:
            assert entry["iou"] is None
    present = [e["iou"] for e in report["classes"] if e["iou"] is not None]
    assert report["miou"] == pytest.approx(np.mean(present), abs=1e-5)
    damage_pred, damage_true = (labels > 0) & inside, (truth > 0) & inside
    assert report["damage_iou"] == pytest.approx((damage_pred & damage_true).sum() / (damage_pred | damage_true).sum(),
                                                 abs=1e-6)
    assert report["damaged_pixels"] == damage_pred.sum()


def test_area_report_without_mask_takes_the_whole_image_as_the_object():
    labels = np.array([[0, 0, 3, 3], [0, 7, 7, 7]], dtype=np.uint8)
    report = area_report(labels, ARTEFACT)
    assert report["object_pixels"] == 8 and report["damaged_pixels"] == 5 and "miou" not in report
    assert [e["percent"] for e in report["classes"] if e["pixels"]] == [37.5, 25.0, 37.5]


MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    from tiles import Tiling, predict_image

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    torch.manual_seed(42)
    model = torch.nn.Conv2d(3, 16, 1)
    image = np.random.default_rng(42).integers(0, 256, (3000, 2500, 3), dtype=np.uint8)
    predict_image(model, image[:300, :300], Tiling(64))
    before = status("VmRSS")
    labels = predict_image(model, image, Tiling(64, overlap=0.25, batch_size=8))
    grown = status("VmHWM") - before
    crop = image[-200:, -300:]
    with torch.no_grad():
        x = torch.from_numpy(crop).permute(2, 0, 1).float() / 255
        x = (x - torch.tensor({mean}).view(3, 1, 1)) / torch.tensor({std}).view(3, 1, 1)
        logits = model(x[None])[0]
    top2 = logits.softmax(0).topk(2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-5).numpy()
    same = bool((labels[-200:, -300:] == logits.argmax(0).numpy())[clear].all())
    print(json.dumps({{"shape": list(labels.shape), "peak_growth_mb": grown, "corner_matches": same}}))
""").format(mean=tuple(MEAN), std=tuple(STD))


def test_large_image_runs_in_memory_bounded_by_tile_rows_not_image_area():
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(ROOT)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["shape"] == [3000, 2500] and result["corner_matches"]
    whole_image_probabilities_mb = 16 * 3000 * 2500 * 4 / 2**20
    assert result["peak_growth_mb"] < whole_image_probabilities_mb / 8


def write_checkpoint(folder, heads="fine", decoder="unet", scheme=ARTEFACT, carries_scheme=True, work_size=None,
                     varied=False, name="best.pt"):
    """A checkpoint dict as train.py writes it (with an optimizer state as large as AdamW's, carries_scheme=False:
    as it did before checkpoints carried their label scheme), for a tiny randomly initialised model; varied
    scales its classifier up so that its labels change with the picture (random weights alone predict one
    class everywhere)."""
    from model import build_model
    config = {"encoder": "mit_b0", "decoder": decoder, "heads": heads, "norm": "bn", "img_size": 64,
              "num_classes": scheme.num_classes}
    if work_size is not None:
        config["work_size"] = work_size
    if carries_scheme:
        config["classes"] = scheme_to_dict(scheme)
    torch.manual_seed(42)
    model = build_model(config["encoder"], scheme.num_classes, decoder=decoder, heads=heads, img_size=64, norm="bn",
                        num_groups=len(scheme.groups) if scheme.groups else None)
    if varied:
        with torch.no_grad():
            model.heads.fine.bias.zero_()
            model.heads.fine.weight.mul_(50)
    state = model.state_dict()
    moments = {k: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)} for k, v in state.items()
               if v.is_floating_point()}
    path = folder / name
    torch.save({"model": state, "optimizer": {"state": moments}, "config": config, "epoch": 3, "step": 12,
                "best_miou": 0.25}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    with module_folder(request, tmp_path_factory, "run") as base:
        yield write_checkpoint(base)


def test_cli_writes_maps_reports_areas_and_a_page_for_every_image(tmp_path, checkpoint):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    Image.fromarray(random_image(97, 131)).save(images / "fresco.png")
    Image.fromarray(random_image(50, 70, seed=1)).save(images / "film.jpg")
    done = run_script("predict.py", "--checkpoint", checkpoint, images, "--out", out, "--overlap", "0.5",
                      "--tile-batch", "3", "--threads", "1")
    assert done.returncode == 0, done.stderr
    # The folder's progress: one plain line per image with the ETA of the rest (SLURM logs have no \r).
    assert [line.split(",")[0] for line in done.stderr.splitlines() if line.startswith("image ")] == \
        ["image 1/2 film.jpg", "image 2/2 fresco.png"]
    assert "\r" not in done.stderr
    rows = list(csv.DictReader(open(out / "areas.csv", encoding="utf-8")))
    assert [row["file"] for row in rows] == ["film.jpg", "fresco.png"]
    for row in rows:
        image = np.array(Image.open(images / row["file"]))
        mask = Image.open(out / f"{Path(row['file']).stem}_mask.png")
        labels = np.array(mask)
        assert mask.mode == "P" and labels.shape == image.shape[:2] and labels.max() < 16
        assert (int(row["width"]), int(row["height"])) == (image.shape[1], image.shape[0])
        assert int(row["object_pixels"]) == labels.size and row["object_source"] == "whole image"
        assert [int(row[f"{name} px"]) for name in CLASS_NAMES] == [int((labels == k).sum()) for k in range(16)]
        assert sum(float(row[f"{name} %"]) for name in CLASS_NAMES) == pytest.approx(100, abs=0.01)
        assert int(row["damage_px"]) == int((labels > 0).sum())
        assert float(row["damage_%"]) == pytest.approx(100 * (labels > 0).mean(), abs=1e-4)
        report = json.loads((out / f"{Path(row['file']).stem}_report.json").read_text())
        assert report["damaged_pixels"] == int(row["damage_px"]) and "miou" not in report
        overlay = Image.open(out / report["outputs"]["overlay"])
        assert overlay.width >= image.shape[1] and overlay.height > image.shape[0]
    assert (out / "index.html").is_file() and not (out / "scores.csv").exists()


def test_cli_consistency_with_a_hierarchical_upernet_checkpoint(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path, heads="hierarchical", decoder="upernet")
    Image.fromarray(random_image(70, 90)).save(tmp_path / "mosaic.png")
    assert main([str(a) for a in ["--checkpoint", checkpoint, tmp_path / "mosaic.png", "--out", tmp_path / "out",
                                  "--consistency", "--tta"]]) == 0
    report = json.loads((tmp_path / "out" / "mosaic_report.json").read_text())
    assert report["settings"]["consistency"] and report["object_pixels"] == 70 * 90
    assert np.array(Image.open(tmp_path / "out" / "mosaic_mask.png")).shape == (70, 90)


def error_of(capsys, argv):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_cli_user_errors_are_one_line_naming_the_file_or_flag(tmp_path, capsys, checkpoint):
    Image.fromarray(random_image(8, 8)).save(tmp_path / "a.png")
    assert "missing.pt" in error_of(capsys, ["--checkpoint", tmp_path / "missing.pt", tmp_path / "a.png",
                                             "--out", tmp_path / "o"])

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in error_of(capsys, ["--checkpoint", checkpoint, empty, "--out", tmp_path / "o"])

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "broken.png" in error_of(capsys, ["--checkpoint", checkpoint, broken, "--out", tmp_path / "o"])

    raw = tmp_path / "raw.pt"
    torch.save(pointwise_model().state_dict(), raw)
    assert "raw.pt" in error_of(capsys, ["--checkpoint", raw, tmp_path / "a.png", "--out", tmp_path / "o"])

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "notes.pt" in error_of(capsys, ["--checkpoint", text, tmp_path / "a.png", "--out", tmp_path / "o"])

    assert "--overlap" in error_of(capsys, ["--checkpoint", checkpoint, tmp_path / "a.png", "--out", tmp_path / "o",
                                            "--overlap", "1"])
    for flag in ("--object", "--truth"):
        assert flag in error_of(capsys, ["--checkpoint", checkpoint, tmp_path / "a.png", "--out", tmp_path / "o",
                                         flag, tmp_path / "nowhere"])


def test_masks_which_meant_two_things_is_refused_naming_object_and_truth(tmp_path, capsys, checkpoint):
    err = error_of(capsys, ["--checkpoint", checkpoint, tmp_path, "--out", tmp_path / "o", "--masks", tmp_path])
    assert "--object DIR" in err and "--truth DIR" in err


# Clean is id 2 and the outside of the object 9: nothing in the maps may take 0 for clean or 255 for outside.
MURAL = scheme_from_dict({"classes": [{"id": i, "name": n, "colour": c} for i, (n, c) in enumerate(
    (("crack", "#FF0000"), ("flaking", "#00C000"), ("clean", "#3C5A14"), ("loss", "#0000FF")))],
    "clean": 2, "ignore": 9, "ignore_colour": "#808080"}, "mural")


def test_maps_reports_and_legends_follow_the_label_scheme(tmp_path):
    image = random_image(30, 40)
    labels = np.full((30, 40), 2, np.uint8)
    labels[:10, :20], labels[20:, 30:] = 0, 3
    labels[:, :2] = 9
    report = area_report(labels, MURAL)
    assert [(e["name"], e["pixels"]) for e in report["classes"]] == [
        ("crack", 10 * 18), ("flaking", 0), ("clean", 30 * 38 - 180 - 100), ("loss", 100)]
    assert report["object_pixels"] == 30 * 38 and report["damaged_pixels"] == 280
    write_mask(tmp_path / "m.png", labels, MURAL)
    palette = np.array(Image.open(tmp_path / "m.png").getpalette()[:768]).reshape(256, 3)
    assert [tuple(palette[k]) for k in range(4)] == list(MURAL.colours) and tuple(palette[9]) == (128, 128, 128)
    overlay = np.asarray(render_overlay(image, labels, report, MURAL))
    np.testing.assert_array_equal(overlay[15, 10], image[15, 10])            # clean pixels stay as they are
    np.testing.assert_array_equal(overlay[5, 10], np.rint(0.5 * image[5, 10] + 0.5 * np.array([255, 0, 0])))
    np.testing.assert_array_equal(overlay[15, 0], np.rint(0.5 * image[15, 0] + 0.5 * np.array([128, 128, 128])))
    swatches = {tuple(c) for c in overlay[30:].reshape(-1, 3)}
    assert {(255, 0, 0), (0, 0, 255), (128, 128, 128)} <= swatches and (60, 90, 20) not in swatches


def test_a_checkpoint_from_before_schemes_travelled_is_read_as_artefact_with_a_note(tmp_path, capsys):
    old = write_checkpoint(tmp_path, carries_scheme=False)
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    assert main([str(a) for a in ["--checkpoint", old, tmp_path / "a.png", "--out", tmp_path / "out"]]) == 0
    assert f"note: --checkpoint {old} records no label scheme" in capsys.readouterr().err
    header = next(csv.reader(open(tmp_path / "out" / "areas.csv", encoding="utf-8")))
    assert [column[:-3] for column in header if column.endswith(" px")] == CLASS_NAMES


def test_areas_are_in_mm2_from_the_files_resolution_or_the_flag_and_say_where_the_scale_came_from(tmp_path, checkpoint):
    (tmp_path / "in").mkdir()
    Image.fromarray(random_image(40, 50)).save(tmp_path / "in" / "scan.png", dpi=(300, 300))
    Image.fromarray(random_image(30, 20, seed=1)).save(tmp_path / "in" / "cm.tif",
                                                       tiffinfo={282: 40.0, 283: 40.0, 296: 3})
    Image.fromarray(random_image(30, 20, seed=2)).save(tmp_path / "in" / "camera.jpg", dpi=(72, 72))
    Image.fromarray(random_image(30, 20, seed=3)).save(tmp_path / "in" / "bare.png")
    assert main([str(a) for a in ["--checkpoint", checkpoint, tmp_path / "in", "--out", tmp_path / "a"]]) == 0
    rows = {row["file"]: row for row in csv.DictReader(open(tmp_path / "a" / "areas.csv", encoding="utf-8"))}
    # 300 dpi: a pixel is 25.4/300 mm wide; 40 per cm (ResolutionUnit 3): 0.25 mm.
    for name, pixel_mm in (("scan.png", 25.4 / 300), ("cm.tif", 0.25)):
        row = rows[name]
        assert "file resolution" in row["scale_source"]
        assert float(row["damage_mm2"]) == pytest.approx(int(row["damage_px"]) * pixel_mm ** 2, rel=1e-3)
        for class_name in CLASS_NAMES:
            assert float(row[f"{class_name} mm2"]) == pytest.approx(int(row[f"{class_name} px"]) * pixel_mm ** 2,
                                                                    rel=1e-3, abs=1e-3)
    assert rows["camera.jpg"]["damage_mm2"] == "" and "72 dpi is a software default" in rows["camera.jpg"]["scale_source"]
    assert rows["bare.png"]["damage_mm2"] == "" and "states no resolution" in rows["bare.png"]["scale_source"]
    report = json.loads((tmp_path / "a" / "scan_report.json").read_text())
    assert report["scale"]["px_per_mm"] == pytest.approx([300 / 25.4] * 2, rel=1e-4)

    assert main([str(a) for a in ["--checkpoint", checkpoint, tmp_path / "in", "--out", tmp_path / "b",
                                  "--px-per-mm", "4"]]) == 0
    for row in csv.DictReader(open(tmp_path / "b" / "areas.csv", encoding="utf-8")):
        assert row["scale_source"] == "--px-per-mm 4" and row["px_per_mm"] == "4.0 x 4.0"
        assert float(row["damage_mm2"]) == pytest.approx(int(row["damage_px"]) / 16, abs=1e-3)


def test_a_folder_names_what_it_skips_and_reads_every_format_pillow_reads(tmp_path, capsys, checkpoint):
    photos = tmp_path / "photos"
    (photos / "old").mkdir(parents=True)
    Image.fromarray(random_image(20, 30)).save(photos / "a.bmp")
    Image.fromarray(random_image(20, 30, seed=1)).save(photos / "b.webp", lossless=True)
    (photos / "notes.txt").write_text("condition notes")
    assert main([str(a) for a in ["--checkpoint", checkpoint, photos, "--out", photos / "maps"]]) == 0
    assert "note: skipped notes.txt (not an image format Pillow reads), old/ (a folder: pass it on its own to read " \
           "it)" in capsys.readouterr().err
    assert [row["file"] for row in csv.DictReader(open(photos / "maps" / "areas.csv"))] == ["a.bmp", "b.webp"]
    assert main([str(a) for a in ["--checkpoint", checkpoint, photos, "--out", photos / "maps"]]) == 0
    assert "note: skipped maps/ (the --out folder), notes.txt" in capsys.readouterr().err


def test_out_in_the_images_folder_never_reads_back_its_outputs_or_replaces_a_users_file(tmp_path, capsys, checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(random_image(20, 30)).save(photos / "a.png")
    Image.fromarray(random_image(20, 30, seed=1)).save(photos / "b.png")
    for _ in range(2):
        assert main([str(a) for a in ["--checkpoint", checkpoint, photos, "--out", photos]]) == 0
    assert [row["file"] for row in csv.DictReader(open(photos / "areas.csv"))] == ["a.png", "b.png"]
    outputs = [p for p in photos.iterdir() if not p.name.startswith(".") and p.name not in ("a.png", "b.png")]
    assert f"skipped {len(outputs)} files predict.py wrote there earlier" in capsys.readouterr().err

    # A user's own a_mask.png (say, a hand-drawn mask) beside a.png is an image, and never overwritten.
    user = tmp_path / "mine"
    user.mkdir()
    Image.fromarray(random_image(20, 30)).save(user / "a.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(user / "a_mask.png")
    before = (user / "a_mask.png").read_bytes()
    err = error_of(capsys, ["--checkpoint", checkpoint, user, "--out", user])
    assert f"{user / 'a_mask.png'} exists and was not written by predict.py" in err
    assert (user / "a_mask.png").read_bytes() == before and not (user / "areas.csv").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 160 KiB tmpfs (needs root to mount), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_predict_on_a_full_disk_ends_in_one_line_naming_the_out_folder(tmp_path, small_disk, checkpoint):
    (tmp_path / "in").mkdir()
    for i in range(6):
        Image.fromarray(random_image(150, 200, seed=i)).save(tmp_path / "in" / f"p{i}.png")
    done = run_script("predict.py", "--checkpoint", checkpoint, tmp_path / "in", "--out", small_disk, "--threads", "1")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {small_disk}: disk full writing ") and "Traceback" not in done.stderr
    assert last.endswith("pass another --out (the maps of the images before it are complete, in areas.csv)")
    finished = [row["file"] for row in csv.DictReader(open(small_disk / "areas.csv"))]
    assert 0 < len(finished) < 6, "the disk holds the first maps and runs out before the last"
    for name in finished:
        Image.open(small_disk / f"{Path(name).stem}_mask.png").load()
    assert not list(small_disk.glob(".*.tmp*")), "no half-written file is left behind"


def test_the_portable_model_is_small_predicts_the_same_maps_and_carries_the_ema_weights(tmp_path, checkpoint):
    model_file = tmp_path / "model.pt"
    done = run_script("predict.py", "--checkpoint", checkpoint, "--export", model_file)
    assert done.returncode == 0, done.stderr
    assert f"wrote {model_file}" in done.stdout
    portable = torch.load(model_file, weights_only=True)
    assert set(portable) == {"format", "model", "config", "trained"} and portable["format"] == "artdamage-model"
    assert portable["config"]["classes"] == scheme_to_dict(ARTEFACT)
    assert portable["config"]["normalisation"] == {"mean": list(MEAN), "std": list(STD)}
    assert model_file.stat().st_size < checkpoint.stat().st_size / 2
    Image.fromarray(random_image(70, 90)).save(tmp_path / "a.png")
    masks = []
    for source in (checkpoint, model_file):
        assert main([str(a) for a in ["--checkpoint", source, tmp_path / "a.png", "--out", tmp_path / source.stem]]) == 0
        masks.append(np.asarray(Image.open(tmp_path / source.stem / "a_mask.png")))
    np.testing.assert_array_equal(*masks)

    # A run that kept a weight average predicts with it, and so does its model.pt.
    saved = torch.load(checkpoint, weights_only=True)
    averaged = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in saved["model"].items()}
    torch.save({**saved, "ema": averaged}, tmp_path / "ema.pt")
    assert run_script("predict.py", "--checkpoint", tmp_path / "ema.pt", "--export", tmp_path / "m2.pt").returncode == 0
    weights = torch.load(tmp_path / "m2.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], averaged[k]) for k in averaged)
