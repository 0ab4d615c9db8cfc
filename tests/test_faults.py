"""Faults and bad input, second round: nothing lost, nothing executed, nothing silently wrong."""
import csv
import io
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import files
import prepare
import step
import train
import writes
from conftest import ROOT, run_script
from labels import UserError, artefact_scheme
from test_predict import write_checkpoint
from test_train import final_test, metrics, poison_loss_at_call, tiny, train_losses

EXIF_ORIENTATION = 0x0112


def one_line_error(result):
    # Progress lines (preload: ...) may come first; the error itself is one line.
    lines = [line for line in result.stderr.splitlines() if not line.startswith("preload:")]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_rerunning_into_a_finished_run_folder_refuses_and_keeps_everything(synthetic_root, tmp_path):
    assert run_script(*tiny(synthetic_root, tmp_path, "--epochs", "1")).returncode == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    line = one_line_error(run_script(*tiny(synthetic_root, tmp_path, "--epochs", "1", "--lr", "0.01")))
    assert "--resume" in line and "--run-dir" in line and str(tmp_path) in line
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_a_fresh_start_never_appends_to_an_old_metrics_file(synthetic_root, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "miou": 0.9}) + "\n")
    assert run_script(*tiny(synthetic_root, tmp_path, "--epochs", "1")).returncode == 0
    assert [record.get("epoch") for record in metrics(tmp_path)] == [1, None]
    assert "miou" not in metrics(tmp_path)[0]


class RunsCode:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_no_entry_point_runs_a_pickled_payload(synthetic_root, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {"encoder": "mit_b0"}, "payload": RunsCode(marker)}, evil)
    runs = {
        "eval-only": ["train.py", "--eval-only", "--checkpoint", evil],
        "resume": tiny(synthetic_root, tmp_path / "run", "--resume", "--checkpoint", evil),
        "predict": ["predict.py", "--checkpoint", evil, ROOT / "README.md", "--out", tmp_path / "out"],
        "weights": tiny(synthetic_root, tmp_path / "run2", "--weights", evil, "--epochs", "1"),
    }
    for name, args in runs.items():
        line = one_line_error(run_script(*args))
        assert str(evil) in line, name
        assert not marker.exists(), f"{name} unpickled the payload"


def test_a_png_renamed_to_pt_is_called_what_it_is(tmp_path):
    fake = tmp_path / "best.pt"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(fake, format="PNG")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        checkpoint.load_checkpoint(fake)


def camera_photo(path, orientation, display):
    """Saves display (H, W, 3) as a sensor-oriented photo whose EXIF orientation turns it back upright."""
    sensor = {6: np.rot90(display, 1), 8: np.rot90(display, -1)}[orientation]
    image = Image.fromarray(np.ascontiguousarray(sensor))
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif)


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_to_images_not_masks(tmp_path, orientation, suffix):
    display = np.zeros((30, 50, 3), np.uint8)
    display[:, :10] = (255, 0, 0)             # a red band along the left edge as the viewer sees it
    mask = np.zeros((30, 50), np.uint8)
    mask[:, :10] = 11
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    camera_photo(root / "images" / f"photo{suffix}", orientation, display)
    Image.fromarray(mask).save(root / "annotations" / "photo.png")
    image = files.read_image(root / "images" / f"photo{suffix}")
    assert image.shape == (30, 50, 3)
    assert (image[:, :10, 0] > 200).all() and (image[:, 20:, 0] < 60).all()
    assert "ok: 1 image/mask pairs" in prepare.check(root)
    small_image, small_mask = files.load_working(files.list_samples(root)[0], 20, 0, artefact_scheme())
    red = small_image[..., 0] > 128
    assert (small_mask[red] == 11).mean() > 0.9 and (small_mask[~red] == 0).mean() > 0.9


def test_ingest_turns_oriented_photos_upright(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    display = np.zeros((30, 50, 3), np.uint8)
    display[:, :10] = 255
    camera_photo(tmp_path / "photo.jpg", 6, display)
    mask = io.BytesIO()
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(mask, format="PNG")
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"id": ["photo"], "image": [{"bytes": (tmp_path / "photo.jpg").read_bytes()}],
                             "annotation": [{"bytes": mask.getvalue()}]}), tmp_path / "shards" / "a.parquet")
    prepare.prepare([tmp_path / "shards"], tmp_path / "out")
    image = np.asarray(Image.open(tmp_path / "out" / "images" / "photo.png"))
    assert image.shape == (30, 50, 3) and image[:, :10].mean() > 200


def parquet_rows(folder, ids):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()),
                             "image": [{"bytes": png.getvalue()}] * len(ids),
                             "annotation": [{"bytes": png.getvalue()}] * len(ids)}), folder / "rows.parquet")
    return folder


@pytest.mark.parametrize("ids, words", [(["a", None], "row 2: id is empty"),
                                        (["a", "x" * 300], "row 2: id is 300 characters long"),
                                        (["../up"], "row 1 (id ../up): id is not a safe file name")])
def test_ingest_names_the_row_of_a_bad_id(tmp_path, ids, words):
    shards = parquet_rows(tmp_path / "shards", ids)
    with pytest.raises(UserError, match=r"rows\.parquet " + words.replace("(", r"\(").replace(")", r"\)")):
        prepare.prepare([shards], tmp_path / "out")


def test_ingest_refuses_a_non_empty_folder_unless_overwrite_and_then_drops_stale_images(tmp_path):
    out = tmp_path / "out"
    prepare.prepare([parquet_rows(tmp_path / "old", ["old"])], out)
    with pytest.raises(UserError, match="--out .*not empty.*--overwrite"):
        prepare.prepare([parquet_rows(tmp_path / "new", ["new"])], out)
    prepare.prepare([tmp_path / "new"], out, overwrite=True)
    assert [s.id for s in files.list_samples(out)] == ["new"]
    assert [row[0] for row in csv.reader(open(out / "metadata.csv"))][1:] == ["new"]


def test_ingest_never_writes_through_a_planted_symlink(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "images").mkdir(parents=True)
    os.symlink(victim, out / "images" / f".img.png.tmp{os.getpid()}")
    prepare.prepare([parquet_rows(tmp_path / "shards", ["img"])], out, overwrite=True)
    assert victim.read_text() == "precious"
    assert files.read_image(out / "images" / "img.png").shape == (8, 8, 3)


@pytest.mark.parametrize("flags, words", [
    (["--clip", "-1"], "--clip -1.0: must be a positive"),
    (["--lr", "-1"], "--lr -1.0: must be a positive"),
    (["--lr", "nan"], "--lr nan: must be a positive"),
    (["--pct-start", "1.5"], "--pct-start 1.5: must be between 0 and 1"),
    (["--log-every", "0"], "--log-every 0: must be at least 1"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be 0 or more"),
    (["--seed", "-1"], "--seed -1: must be between 0"),
    (["--synthetic-size", "0"], "--synthetic-size 0: must be at least 32"),
    (["--micro-batch", "0"], "--micro-batch 0: must be at least 1"),
    (["--dist-timeout", "0"], "--dist-timeout 0: must be at least 1"),
    (["--max-skipped", "0"], "--max-skipped 0: must be at least 1"),
    (["--folds", "1"], "--folds 1: must be at least 2"),
])
def test_every_numeric_flag_is_checked_in_one_line(flags, words, capsys):
    assert train.main(["--img-size", "64", "--dry-run", *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {words}")


def test_run_dir_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert train.main(["--img-size", "64", "--dry-run", "--run-dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --run-dir {tmp_path / 'file'}: is a file")


def test_skip_nonfinite_gives_up_after_max_skipped_consecutive_steps(synthetic_root, tmp_path, monkeypatch,
                                                                     capsys):
    poison_loss_at_call(monkeypatch, 0)
    code = train.main(tiny(synthetic_root, tmp_path, "--skip-nonfinite", "--max-skipped", "2")[1:])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("preload:")]
    assert code == 2 and len(err) == 1 and "3 consecutive steps had a non-finite loss" in err[0]
    assert not (tmp_path / "best.pt").exists()


def test_a_skipped_first_step_moves_the_schedule_on_without_torchs_out_of_order_warning():
    def fresh():
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))

    optimizer, schedule = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step.advance(schedule)
    assert [str(w.message) for w in caught] == [] and optimizer.param_groups[0]["lr"] == 0.5
    # The warning it silences is torch's, as torch words it today: a bare step still raises it.
    _, schedule = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedule.step()
    assert any("lr_scheduler.step()` before `optimizer.step()`" in str(w.message) for w in caught)


def test_stepping_the_schedule_leaves_a_repeating_warning_shown_once():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        step.advance(schedule)
        for _ in range(3):
            warnings.warn("a warning some step raises every time", UserWarning)
            optimizer.step()
            step.advance(schedule)
    assert [str(w.message) for w in caught] == ["a warning some step raises every time"]
    assert optimizer.param_groups[0]["lr"] == 0.2


def test_nonfinite_before_any_checkpoint_says_none_was_written(synthetic_root, tmp_path, monkeypatch, capsys):
    poison_loss_at_call(monkeypatch, 1)
    assert train.main(tiny(synthetic_root, tmp_path)[1:]) == 2
    assert "no checkpoint was written yet" in capsys.readouterr().err


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.pt.tmp{dead.stdout.strip()}"
    live = tmp_path / f".last.pt.tmp{os.getpid()}"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    writes.remove_stale_temporaries(tmp_path)
    assert not stale.exists() and live.exists()


def test_predict_skips_a_bad_file_continues_and_fails_at_the_end(tmp_path):
    ckpt = write_checkpoint(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "c.png"):
        Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(images / name)
    (images / "b.png").write_bytes(b"not a png")
    result = run_script("predict.py", "--checkpoint", ckpt, images, "--out", tmp_path / "out")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "b.png" in errors[0] and "1 of 3 images failed" in errors[1]
    rows = list(csv.DictReader(open(tmp_path / "out" / "areas.csv")))
    assert {row["file"] for row in rows} == {"a.png", "c.png"}


def test_sigterm_to_one_of_two_ranks_checkpoints_within_a_step_and_resume_matches(synthetic_root, tmp_path):
    # --split single tests on 5 of 24 images and selects on 1: 18 train with batch 6 give 3 steps per epoch.
    flags = ("--split", "single", "--inner-frac", "0.05", "--batch-size", "6", "--epochs", "2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = subprocess.run([*torchrun, *map(str, tiny(synthetic_root, tmp_path / "straight", *flags))],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen([*torchrun, *map(str, tiny(synthetic_root, run_dir, *flags, "--log-every", "1"))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if "epoch 1 step 1/3" in line:
                ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
                os.kill(int(ranks[-1]), signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert "SIGTERM: saved" in out and saved["epoch"] == 0 and saved["step"] in (2, 3)
    resumed = subprocess.run([*torchrun, *map(str, tiny(synthetic_root, run_dir, *flags, "--resume"))],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert final_test(run_dir)["test"] == final_test(tmp_path / "straight")["test"]
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-6)
