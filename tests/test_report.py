"""report.py: pictures and report.md of a real tiny run; absent classes marked; overlays a conservator can read."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import overlay
from areas import area_report
from conftest import ROOT, run_script
from labels import artefact_scheme, scheme_to_dict
from overlay import legend_entries, render_overlay
from report import DPI, FIGSIZE, PANEL_ROW, build_report, class_iou_bars, main, read_records

ARTEFACT = artefact_scheme()
CLASS_NAMES, PALETTE = list(ARTEFACT.names), list(ARTEFACT.colours)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_root):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    done = subprocess.run([sys.executable, "train.py", "--encoder", "mit_b0", "--img-size", "64", "--norm", "gn",
                           "--batch-size", "4", "--epochs", "2", "--data", str(synthetic_root), "--run-dir",
                           str(run_dir), "--log-every", "1000"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "report.md").is_file() and "report: " in done.stdout, "training ends with its report"
    # train.py's confusion.json replaced by a made-up one with a class absent from the truth (Hair).
    rng = np.random.default_rng(42)
    fine = rng.integers(0, 30, (16, 16)) + np.diag(np.full(16, 300))
    fine[5] = 0
    (run_dir / "confusion.json").write_text(json.dumps({
        "fine": fine.tolist(), "coarse": (rng.integers(0, 30, (4, 4)) + np.diag(np.full(4, 200))).tolist(),
        "binary": [[900, 40], [60, 500]], "by_material": {"Paper": fine.tolist(), "Film": (fine // 3).tolist()},
        "by_content": {"Artistic": fine.tolist()}}))
    return run_dir


def png_size(name, images=4):
    width, height = FIGSIZE[name]
    if name == "panels":
        height += PANEL_ROW * images
    return round(width * DPI), round(height * DPI)


def test_cli_writes_every_picture_and_report_md_shows_them(run_dir):
    done = run_script("report.py", run_dir, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = (run_dir / "report.md").read_text()
    pictures = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.png"))
    assert {"curves.png", "class_iou.png", "confusion.png", "groups.png", "panels.png"} <= set(pictures)
    assert len([p for p in pictures if p.startswith("samples/")]) == 8
    for name in pictures:
        assert f"({name})" in report
        image = Image.open(run_dir / name)
        image.verify()
        image = Image.open(run_dir / name)
        if name.startswith("samples/"):
            # Masks are palette PNGs (ids as values, ARTeFACT colours), not near-black greyscale.
            assert image.mode == "P" and image.getpalette()[3:6] == list(PALETTE[1])
            continue
        assert image.size == png_size(name[:-4])
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20
    assert "| Hair |" in report and "mIoU by material and content" in report


def test_report_without_confusion_or_checkpoint_says_what_is_missing(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", bare)
    shutil.copy(run_dir / "config.json", bare)
    report = build_report([bare]).read_text()
    assert "No `confusion.json`" in report and "No best.pt or last.pt" in report
    assert sorted(p.name for p in bare.glob("*.png")) == ["class_iou.png", "curves.png"]


def test_a_select_last_run_says_it_has_no_validation_curve(run_dir, tmp_path):
    last = tmp_path / "last"
    last.mkdir()
    shutil.copy(run_dir / "config.json", last)
    (last / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "val"}) + "\n"
                                                for r in read_records(run_dir)))
    report = build_report([last]).read_text()
    assert "No inner validation (`--select last`" in report and "Validation scores are" not in report
    assert Image.open(last / "curves.png").size == png_size("curves")


def test_several_runs_are_drawn_together_into_out(run_dir, tmp_path):
    second = tmp_path / "fold1"
    shutil.copytree(run_dir, second, ignore=shutil.ignore_patterns("*.png", "report.md", "samples"))
    out = tmp_path / "cv"
    report = build_report([run_dir, second], out=out, images=1).read_text()
    assert {"panels-1.png", "panels-2.png", "curves.png"} <= {p.name for p in out.glob("*.png")}
    assert "(summed)" in report and Image.open(out / "panels-1.png").size == png_size("panels", images=1)


def test_absent_classes_are_marked_not_zero():
    record = {"iou": {name: 0.0 for name in CLASS_NAMES} | {"Clean": 0.9}, "absent": ["Hair", "Stamp"]}
    bars = class_iou_bars(record, CLASS_NAMES)
    assert bars[CLASS_NAMES.index("Hair")] is None and bars[CLASS_NAMES.index("Stamp")] is None
    assert bars[0] == 0.9 and bars[CLASS_NAMES.index("Dust")] == 0.0


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "metrics.jsonl" in err
    (tmp_path / "config.json").write_text(json.dumps({"classes": scheme_to_dict(ARTEFACT)}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "val": {
        "miou": 0.1, "binary_iou": None, "iou": {}, "absent": []}}) + "\n")
    (tmp_path / "confusion.json").write_text(json.dumps({"fine": [[1, 2], [3, 4]]}))
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "confusion.json" in err and "16x16" in err


def test_legend_has_no_clean_swatch_and_tiny_classes_read_below_a_hundredth_of_a_percent():
    labels = np.zeros((200, 600), dtype=np.uint8)
    labels[:100] = 1
    labels[150, 300] = 11
    texts = [text for _, text in legend_entries(area_report(labels, ARTEFACT), False, ARTEFACT)]
    assert texts == ["Damaged 50.00 %", "Material loss 50.00 %", "Stamp <0.01 %"]
    assert not any(text.startswith("Clean") for text in texts)


def test_small_dark_damage_is_outlined_in_full_colour_on_a_dark_image():
    image = np.full((60, 60, 3), 30, dtype=np.uint8)
    labels = np.zeros((60, 60), dtype=np.uint8)
    labels[10, 10] = 11
    labels[30:40, 30:40] = 14
    overlay = np.asarray(render_overlay(image, labels, area_report(labels, ARTEFACT), ARTEFACT))[:60].astype(int)
    assert tuple(overlay[10, 10]) == PALETTE[11] and tuple(overlay[30, 35]) == PALETTE[14]
    assert np.abs(overlay[10, 10] - image[10, 10]).sum() > 60
    interior = np.rint(0.5 * image[35, 35] + 0.5 * np.array(PALETTE[14]))
    np.testing.assert_array_equal(overlay[35, 35], interior)


def test_outlines_do_not_depend_on_where_row_chunks_are_cut(monkeypatch):
    rng = np.random.default_rng(42)
    image = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    labels = rng.choice([0, 0, 0, 3, 11, 255], size=(50, 40)).astype(np.uint8)
    report = area_report(labels, ARTEFACT, truth=labels)
    whole = np.asarray(render_overlay(image, labels, report, ARTEFACT))
    monkeypatch.setattr(overlay, "ROWS_PER_CHUNK", 7)
    np.testing.assert_array_equal(np.asarray(render_overlay(image, labels, report, ARTEFACT)), whole)


def test_matplotlib_is_imported_only_by_report_py():
    users = [p.name for p in ROOT.glob("*.py") if re.search(r"^\s*(import|from) matplotlib", p.read_text(), re.M)]
    assert users == ["report.py"]


def test_a_two_rank_run_ends_with_its_report(synthetic_root, tmp_path):
    # The report runs on rank 0 alone: nothing in it may wait for the other rank.
    run_dir = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", "--encoder", "mit_b0", "--img-size", "64", "--norm", "gn", "--batch-size", "4",
                           "--epochs", "1", "--data", str(synthetic_root), "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "report.md").is_file() and (run_dir / "panels.png").is_file()
