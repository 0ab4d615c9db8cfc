"""train.py as users rely on it: exact mIoU, DDP equals one process, resume equals an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
import data
import files
import preload
import train
from checkpoint import save_checkpoint
from labels import CLASS_NAMES
from metrics import eval_metrics


def tiny(data_root, run_dir, *extra):
    return ["train.py", "--encoder", "mit_b0", "--img-size", "64", "--norm", "gn", "--batch-size", "4",
            "--epochs", "2", "--data", str(data_root), "--run-dir", str(run_dir), "--log-every", "1000", *extra]


def torchrun(*args, timeout=400):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                          capture_output=True, timeout=timeout)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_scales_with_global_batch():
    for batch, lr in ((96, 1e-3), (32, 1e-3 / 3), (48, 5e-4)):
        cfg = train.resolve_config(train.parse_args(["--batch-size", str(batch), "--img-size", "64"]), 1,
                                   torch.device("cpu"))
        assert cfg["lr"] == pytest.approx(lr)
    cfg = train.resolve_config(train.parse_args(["--encoder", "mit_b3", "--img-size", "64"]), 2, torch.device("cpu"))
    assert (cfg["batch_size"], cfg["per_rank_batch"]) == (32, 16)
    cfg = train.resolve_config(train.parse_args(["--batch-size", "32", "--micro-batch", "4", "--img-size", "64"]), 2,
                               torch.device("cpu"))
    assert cfg["accum_steps"] == 4


def test_two_runs_with_the_same_seed_give_identical_metrics(synthetic_root, tmp_path):
    runs = [run_script(*tiny(synthetic_root, tmp_path / name)) for name in ("a", "b")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [(m["train_loss"], m["miou"], m["iou"]) for m in a] == [(m["train_loss"], m["miou"], m["iou"]) for m in b]
    assert {"epoch", "train_loss", "miou", "iou", "binary_iou", "absent", "img_s", "epoch_time_s", "peak_mem_mb",
            "lr"} <= set(a[0])
    assert (tmp_path / "a" / "best.pt").is_file() and (tmp_path / "a" / "last.pt").is_file()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["encoder"] == "mit_b0"
    assert "epoch 2/2" in runs[0].stdout and "mIoU" in runs[0].stdout


def test_two_ranks_match_one_process(synthetic_root, tmp_path):
    single = run_script(*tiny(synthetic_root, tmp_path / "one", "--loss", "ce", "--class-weights", "none"))
    assert single.returncode == 0, single.stderr
    double = torchrun(*tiny(synthetic_root, tmp_path / "two", "--loss", "ce", "--class-weights", "none"))
    assert double.returncode == 0, double.stderr
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # Same global batches in the same order. DDP averages the two ranks' mean losses with equal weight while one
    # process averages over all valid pixels, so images with 255 borders shift the curve slightly.
    np.testing.assert_allclose([m["train_loss"] for m in one], [m["train_loss"] for m in two], rtol=3e-3)
    # Evaluating one checkpoint: a world of 2 counts every val pixel exactly once, so mIoU is identical.
    args = ["--eval-only", "--checkpoint", tmp_path / "one" / "last.pt", "--data", synthetic_root,
            "--img-size", "64", "--encoder", "mit_b0"]
    eval_one = run_script("train.py", *args)
    eval_two = torchrun("train.py", *args)
    assert eval_one.returncode == 0 and eval_two.returncode == 0, eval_one.stderr + eval_two.stderr
    m1, m2 = json.loads(eval_one.stdout), json.loads(eval_two.stdout)
    assert m1["miou"] == m2["miou"] and m1["iou"] == m2["iou"]
    assert m1["miou"] == pytest.approx(one[-1]["miou"])


def test_logged_metrics_of_two_cpu_ranks_with_batchnorm_equal_eval_only_of_the_checkpoint(synthetic_root, tmp_path):
    # BatchNorm keeps running statistics per rank; rank 0's are the ones evaluated and saved.
    done = torchrun(*tiny(synthetic_root, tmp_path, "--norm", "bn", "--epochs", "1"))
    assert done.returncode == 0, done.stderr
    logged = metrics(tmp_path)[-1]
    for ranks in ("1", "2"):
        args = ["train.py", "--eval-only", "--checkpoint", tmp_path / "best.pt", "--data", synthetic_root]
        result = run_script(*args) if ranks == "1" else torchrun(*args)
        assert result.returncode == 0, result.stderr
        scored = json.loads(result.stdout[result.stdout.index("{"):])
        assert (scored["miou"], scored["iou"]) == (logged["miou"], logged["iou"]), ranks


def test_hierarchical_upernet_trains_resumes_and_summarises_with_one_name_per_head(synthetic_root, tmp_path):
    flags = ("--decoder", "upernet", "--heads", "hierarchical")
    assert run_script(*tiny(synthetic_root, tmp_path, *flags)).returncode == 0
    records = metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert isinstance(record["binary_iou"], float), "the fine head's damage-vs-clean IoU"
        assert set(record["coarse"]["iou"]) == {"Clean", "Structural loss", "Surface deposits", "Additions & optical"}
        assert set(record["binary"]["iou"]) == {"Clean", "Damage"}
    confusion = json.loads((tmp_path / "confusion.json").read_text())
    assert [len(confusion[h]) for h in ("fine", "coarse", "binary")] == [16, 4, 2]
    resumed = run_script(*tiny(synthetic_root, tmp_path, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(tmp_path) == records
    summary = run_script("train.py", "--summary", tmp_path)
    assert summary.returncode == 0 and "| miou |" in summary.stdout


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(synthetic_root, tmp_path):
    straight = run_script(*tiny(synthetic_root, tmp_path / "straight", "--epochs", "3"))
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *map(str, tiny(synthetic_root, run_dir, "--epochs", "3"))], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "last.pt").is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics(run_dir)) < 3, "the run finished before it could be killed"
    resumed = run_script(*tiny(synthetic_root, run_dir, "--epochs", "3", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    keys = ("epoch", "train_loss", "miou", "iou")
    assert [{k: m[k] for k in keys} for m in metrics(run_dir)] == \
        [{k: m[k] for k in keys} for m in metrics(tmp_path / "straight")]


def test_sigterm_checkpoints_mid_epoch_and_resume_continues(synthetic_root, tmp_path):
    straight = run_script(*tiny(synthetic_root, tmp_path / "straight", "--batch-size", "2", "--epochs", "1"))
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, *map(str, tiny(synthetic_root, run_dir, "--batch-size", "2",
                                                            "--epochs", "1", "--log-every", "1"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "step 2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved" in out
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and 2 <= ckpt["step"] < 8
    resumed = run_script(*tiny(synthetic_root, run_dir, "--batch-size", "2", "--epochs", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = metrics(run_dir)[-1], metrics(tmp_path / "straight")[-1]
    assert (a["miou"], a["iou"]) == (b["miou"], b["iou"])
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_a_killed_rank_stops_the_other_instead_of_hanging(synthetic_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *map(str, tiny(synthetic_root, tmp_path / "run", "--epochs", "50", "--dist-timeout", "60"))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").is_file():
        time.sleep(0.1)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGKILL)
    start = time.time()
    try:
        code = proc.wait(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert code != 0 and time.time() - start < 120


def poison_loss_at_call(monkeypatch, bad_call):
    """Makes the training loss nan at its bad_call-th evaluation (counted from 1)."""
    real = train.make_criterion

    def poisoned(*args):
        criterion = real(*args)
        calls = {"n": 0}

        def loss(outputs, target):
            calls["n"] += 1
            return criterion(outputs, target) * (float("nan") if calls["n"] == bad_call else 1.0)
        return loss
    monkeypatch.setattr(train, "make_criterion", poisoned)


def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(synthetic_root, tmp_path, monkeypatch,
                                                                            capsys):
    poison_loss_at_call(monkeypatch, 4 + 3)
    code = train.main(tiny(synthetic_root, tmp_path)[1:])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: non-finite loss at epoch 2 step 3; last good checkpoint kept in "
                                 f"{tmp_path}; lower --lr, use --precision fp32, or pass --skip-nonfinite"]
    kept = torch.load(tmp_path / "last.pt", weights_only=True)
    assert kept["epoch"] == 1 and len(metrics(tmp_path)) == 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_skip_nonfinite_counts_and_continues(synthetic_root, tmp_path, monkeypatch, capsys):
    poison_loss_at_call(monkeypatch, 2)
    assert train.main(tiny(synthetic_root, tmp_path, "--epochs", "1", "--skip-nonfinite")[1:]) == 0
    record = metrics(tmp_path)[0]
    assert record["skipped_steps"] == 1 and np.isfinite(record["train_loss"])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}, "config": {}})

    def dies_mid_write(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(3)}, "config": {}})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_overfitting_a_handful_of_images_drives_miou_high(synthetic_root):
    torch.manual_seed(0)
    cfg = train.resolve_config(train.parse_args(["--encoder", "mit_b0", "--img-size", "64", "--norm", "gn",
                                                 "--batch-size", "4", "--lr", "0.1"]),
                               1, torch.device("cpu"))
    samples = files.list_samples(synthetic_root)[:4]
    pre = preload.preload(samples, 64)
    parts = train.build_training(dict(cfg, epochs=1), 1, 0, torch.device("cpu"), 250)
    images, masks = next(iter(data.batches(pre, torch.arange(4), 4, pin=False)))
    batch = [data.to_device_batch(images, masks, torch.device("cpu"), None)]
    for _ in range(250):
        train.train_step(parts, batch, cfg, torch.device("cpu"))
    cms = train.evaluate(parts.raw_model, pre, torch.arange(4), cfg, torch.device("cpu"))
    assert eval_metrics(cms)["pixel_acc"] > 0.9
    assert eval_metrics(cms)["miou"] > 0.6
    pre.close()


@pytest.mark.parametrize("flags, message", [
    (["--encoder", "not_a_model"], "--encoder not_a_model: unknown"),
    (["--img-size", "100"], "--img-size 100"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: folder not found"),
    (["--eval-only", "--checkpoint", "/no/such.pt"], "--checkpoint /no/such.pt: file not found"),
    (["--class-weights", "softmax"], "--class-weights softmax"),
    (["--head-weights", "1,2"], "--head-weights 1,2"),
])
def test_bad_flags_give_one_clear_line(synthetic_root, flags, message, tmp_path):
    args = ["train.py", "--data", synthetic_root, "--img-size", "64", "--encoder", "mit_b0", "--batch-size", "4",
            "--epochs", "1", "--run-dir", tmp_path, *flags]
    result = run_script(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0] and "Traceback" not in result.stderr


def test_batch_smaller_than_world_and_foreign_checkpoint_are_refused(synthetic_root, tmp_path):
    result = run_script("train.py", "--batch-size", "1", "--img-size", "64", "--dry-run",
                        env={"WORLD_SIZE": "2"})
    assert result.returncode == 2 and "--batch-size 1: must be a multiple of the 2 ranks" in result.stderr
    assert run_script(*tiny(synthetic_root, tmp_path, "--epochs", "1")).returncode == 0
    result = run_script(*tiny(synthetic_root, tmp_path, "--epochs", "1", "--resume")[:2], "convnext_tiny",
                        *tiny(synthetic_root, tmp_path, "--epochs", "1", "--resume")[3:])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert "trained with --encoder mit_b0, not convnext_tiny" in lines[0]


def test_dry_run_prints_the_resolved_config():
    result = run_script("train.py", "--encoder", "maxvit_tiny", "--img-size", "384", "--dry-run")
    cfg = json.loads(result.stdout)
    assert result.returncode == 0 and cfg["batch_size"] == 48 and cfg["lr"] == pytest.approx(5e-4)


def test_cross_validation_summary_is_mean_and_std_over_folds(tmp_path):
    for fold, miou in enumerate((0.2, 0.3, 0.4)):
        (tmp_path / f"fold{fold}").mkdir()
        lines = [{"epoch": 1, "miou": miou - 0.1, "binary_iou": 0.5, "iou": {c: 0.1 for c in CLASS_NAMES}},
                 {"epoch": 2, "miou": miou, "binary_iou": 0.6, "iou": {c: miou for c in CLASS_NAMES}}]
        (tmp_path / f"fold{fold}" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    result = run_script("train.py", "--summary", *sorted(tmp_path.iterdir()))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| miou "))
    assert "30.00 ± 10.00" in row and "| 20.00 | 30.00 | 40.00 |" in row
