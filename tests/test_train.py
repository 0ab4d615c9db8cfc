"""train.py as users rely on it: exact mIoU, DDP equals one process, resume equals an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, sigterm_at_step, tiny_flags
import config
import data
from distributed import Run
import files
import preload
import step
import train
from checkpoint import save_checkpoint
from labels import artefact_scheme, scheme_from_dict, scheme_to_dict
from metrics import eval_metrics

ARTEFACT = artefact_scheme()
CLASS_NAMES = list(ARTEFACT.names)


def tiny(data_root, run_dir, *extra):
    return ["train.py", *tiny_flags(data_root, run_dir, *extra)]


def torchrun(*args, timeout=400, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                          capture_output=True, timeout=timeout)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epochs(run_dir):
    return [m for m in metrics(run_dir) if "epoch" in m]


def final_test(run_dir):
    tests = [m for m in metrics(run_dir) if "test" in m]
    assert len(tests) == 1, "the test fold is scored once"
    return tests[0]


def test_lr_scales_with_global_batch():
    for batch, lr in ((96, 1e-3), (32, 1e-3 / 3), (48, 5e-4)):
        cfg = config.resolve_config(config.parse_args(["--batch-size", str(batch), "--img-size", "64"]), 1,
                                   torch.device("cpu"))
        assert cfg["lr"] == pytest.approx(lr)
    cfg = config.resolve_config(config.parse_args(["--encoder", "mit_b3", "--img-size", "64"]), 2, torch.device("cpu"))
    assert (cfg["batch_size"], cfg["per_rank_batch"]) == (32, 16)
    cfg = config.resolve_config(config.parse_args(["--batch-size", "32", "--micro-batch", "4", "--img-size", "64"]), 2,
                               torch.device("cpu"))
    assert cfg["accum_steps"] == 4


def test_two_runs_with_the_same_seed_give_identical_metrics(synthetic_root, tmp_path):
    runs = [run_script(*tiny(synthetic_root, tmp_path / name)) for name in ("a", "b")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [{k: m[k] for k in ("epoch", "train_loss", "val") if k in m} for m in a] == \
        [{k: m[k] for k in ("epoch", "train_loss", "val") if k in m} for m in b]
    assert final_test(tmp_path / "a")["test"] == final_test(tmp_path / "b")["test"]
    assert {"epoch", "train_loss", "val", "img_s", "epoch_time_s", "peak_mem_mb", "lr"} <= set(a[0])
    assert {"miou", "iou", "binary_iou", "absent", "by_material", "by_content"} <= set(a[0]["val"])
    assert (tmp_path / "a" / "best.pt").is_file() and (tmp_path / "a" / "last.pt").is_file()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["encoder"] == "mit_b0"
    assert "epoch 2/2" in runs[0].stdout and "test mIoU" in runs[0].stdout
    log = (tmp_path / "a" / "train.log").read_text()
    assert "epoch 2/2" in log and "test mIoU" in log, "a plain run keeps what rank 0 printed"


def train_losses(run_dir):
    return [m["train_loss"] for m in epochs(run_dir)]


def test_evaluation_counts_each_test_image_once_on_any_number_of_ranks(synthetic_root, tmp_path):
    assert run_script(*tiny(synthetic_root, tmp_path, "--epochs", "1")).returncode == 0
    args = ["train.py", "--eval-only", "--checkpoint", tmp_path / "best.pt", "--data", synthetic_root]
    scored = []
    # Three ranks: evaluation trains nothing, so no batch (mit_b0's default 64) has to split over them.
    for done in (run_script(*args), torchrun(*args, nproc=3)):
        assert done.returncode == 0, done.stderr
        scored.append(json.loads(done.stdout[done.stdout.index("{"):])["test"])
    assert scored[0] == scored[1] == final_test(tmp_path)["test"]


def test_logged_metrics_of_two_cpu_ranks_with_batchnorm_equal_eval_only_of_the_checkpoint(synthetic_root, tmp_path):
    # BatchNorm keeps running statistics per rank; rank 0's are the ones evaluated and saved.
    done = torchrun(*tiny(synthetic_root, tmp_path, "--norm", "bn", "--epochs", "1"))
    assert done.returncode == 0, done.stderr
    logged = {"val": epochs(tmp_path)[-1]["val"], "test": final_test(tmp_path)["test"]}
    for ranks, part in (("1", "test"), ("2", "test"), ("1", "val")):
        args = ["train.py", "--eval-only", "--checkpoint", tmp_path / "best.pt", "--data", synthetic_root,
                "--eval-split", part]
        result = run_script(*args) if ranks == "1" else torchrun(*args)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout[result.stdout.index("{"):])[part] == logged[part], (ranks, part)


def test_hierarchical_upernet_trains_resumes_and_summarises_with_one_name_per_head(synthetic_root, tmp_path):
    flags = ("--decoder", "upernet", "--heads", "hierarchical")
    assert run_script(*tiny(synthetic_root, tmp_path, *flags)).returncode == 0
    records = epochs(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    for scores in [r["val"] for r in records] + [final_test(tmp_path)["test"]]:
        assert isinstance(scores["binary_iou"], float), "the fine head's damage-vs-clean IoU"
        assert set(scores["coarse"]["iou"]) == {"Clean", "Structural loss", "Surface deposits", "Additions & optical"}
        assert set(scores["binary"]["iou"]) == {"Clean", "Damage"}
    confusion = json.loads((tmp_path / "confusion.json").read_text())
    assert confusion["split"] == "test" and [len(confusion[h]) for h in ("fine", "coarse", "binary")] == [16, 4, 2]
    before = metrics(tmp_path)
    resumed = run_script(*tiny(synthetic_root, tmp_path, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(tmp_path) == before
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
    assert len(epochs(run_dir)) < 3, "the run finished before it could be killed"
    resumed = run_script(*tiny(synthetic_root, run_dir, "--epochs", "3", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    keys = ("epoch", "train_loss", "val", "test")
    assert [{k: m[k] for k in keys if k in m} for m in metrics(run_dir)] == \
        [{k: m[k] for k in keys if k in m} for m in metrics(tmp_path / "straight")]


def test_sigterm_checkpoints_mid_epoch_and_resume_continues(synthetic_root, tmp_path):
    straight = run_script(*tiny(synthetic_root, tmp_path / "straight", "--batch-size", "2", "--epochs", "1"))
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "preempted"
    stopped = sigterm_at_step(tiny(synthetic_root, run_dir, "--batch-size", "2", "--epochs", "1", "--log-every", "1"))
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM: saved" in stopped.stdout
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and 2 <= ckpt["step"] < 8
    resumed = run_script(*tiny(synthetic_root, run_dir, "--batch-size", "2", "--epochs", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert final_test(run_dir)["test"] == final_test(tmp_path / "straight")["test"]
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-6)


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
    """Makes the training loss nan at its bad_call-th evaluation (counted from 1; 0: every one)."""
    real = step.make_criterion

    def poisoned(*args):
        criterion = real(*args)
        calls, from_sums = {"n": 0}, criterion.from_sums

        def nan_once(sums):
            calls["n"] += 1
            return from_sums(sums) * (float("nan") if bad_call in (0, calls["n"]) else 1.0)
        criterion.from_sums = nan_once
        return criterion
    monkeypatch.setattr(step, "make_criterion", poisoned)


def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(synthetic_root, tmp_path, monkeypatch,
                                                                            capsys):
    poison_loss_at_call(monkeypatch, 3 + 3)  # 14 training images, batch 4: 3 steps per epoch
    code = train.main(tiny(synthetic_root, tmp_path)[1:])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("preload:")]
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
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(3)}, "config": {}})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_overfitting_a_handful_of_images_drives_miou_high(synthetic_root):
    torch.manual_seed(0)
    cfg = config.resolve_config(config.parse_args(["--encoder", "mit_b0", "--img-size", "64", "--norm", "gn",
                                                 "--batch-size", "4", "--lr", "0.1"]),
                               1, torch.device("cpu"))
    samples = files.list_samples(synthetic_root)[:4]
    pre = preload.preload(samples, preload.RowFormat(64, ARTEFACT))
    parts = step.build_training(dict(cfg, epochs=1), step.build_network(cfg, torch.device("cpu"), 1), 1,
                                 torch.device("cpu"), 250)
    images, masks = next(iter(data.batches(pre, torch.arange(4), 4, pin=False)))
    batch = [data.to_device_batch(images, masks, torch.device("cpu"), None)]
    for _ in range(250):
        step.train_step(parts, batch, cfg, torch.device("cpu"))
    cms = train.evaluate(parts.raw_model, data.Part(samples, pre, {}), Run(cfg, torch.device("cpu")))
    assert eval_metrics(cms, ARTEFACT)["pixel_acc"] > 0.9
    assert eval_metrics(cms, ARTEFACT)["miou"] > 0.6
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
    lines = [line for line in result.stderr.splitlines() if not line.startswith("preload:")]
    assert result.returncode == 2 and len(lines) == 1
    assert "--encoder mit_b0 -> convnext_tiny" in lines[0]


def test_dry_run_prints_the_resolved_config():
    result = run_script("train.py", "--encoder", "maxvit_tiny", "--img-size", "384", "--dry-run")
    cfg = json.loads(result.stdout)
    assert result.returncode == 0 and cfg["batch_size"] == 48 and cfg["lr"] == pytest.approx(5e-4)


def fold_run(folder, fold, miou, scheme=ARTEFACT, carries_scheme=True, **config):
    folder.mkdir()
    config = {"encoder": "mit_b0", "select": "inner", "fold": fold, **config}
    if carries_scheme:
        config["classes"] = scheme_to_dict(scheme)
    (folder / "config.json").write_text(json.dumps(config))
    scores = {"miou": miou, "binary_iou": 0.6, "iou": {c: miou for c in scheme.names},
              "by_material": {"Paper": {"miou": miou, "binary_iou": 0.5}}
              | ({"Glass": {"miou": 0.9, "binary_iou": 0.8}} if fold == 0 else {})}
    lines = [{"epoch": 1, "train_loss": 1.0, "val": dict(scores, miou=0.99)},
             {"test": scores, "selected_epoch": 1, "select": "inner"}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_cross_validation_summary_is_test_mean_and_std_over_folds_per_group_too(tmp_path):
    for fold, miou in enumerate((0.2, 0.3, 0.4)):
        fold_run(tmp_path / f"fold{fold}", fold, miou)
    result = run_script("train.py", "--summary", *sorted(tmp_path.iterdir()))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "--select inner" in lines[0] and "scored once" in lines[0]
    row = next(line for line in lines if line.startswith("| miou "))
    assert "30.00 ± 10.00" in row and "| 20.00 | 30.00 | 40.00 |" in row, "the test fold, not the best val epoch"
    assert "99.00" not in result.stdout
    assert "| material/Paper miou | 30.00 ± 10.00 |" in result.stdout
    assert "| material/Glass miou | 90.00 (1 fold) | 90.00 | — | — |" in result.stdout, "one fold has no spread"


def test_summary_refuses_folds_of_different_protocols_and_unfinished_folds(tmp_path):
    fold_run(tmp_path / "a", 0, 0.2)
    fold_run(tmp_path / "b", 1, 0.3, lr=0.5)
    result = run_script("train.py", "--summary", tmp_path / "a", tmp_path / "b")
    assert result.returncode == 2 and "lr=0.5" in result.stderr and len(result.stderr.splitlines()) == 1
    fold_run(tmp_path / "c", 2, 0.3)
    (tmp_path / "c" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n")
    result = run_script("train.py", "--summary", tmp_path / "a", tmp_path / "c")
    assert result.returncode == 2 and "no test record" in result.stderr


def test_summary_rows_are_the_folds_classes_and_folds_of_another_scheme_are_refused(tmp_path):
    mural = scheme_from_dict({"classes": [{"id": 0, "name": "clean", "colour": "#000000"},
                                          {"id": 1, "name": "crack", "colour": "#FF0000"},
                                          {"id": 2, "name": "stain", "colour": "#00FF00"}]}, "mural")
    fold_run(tmp_path / "m0", 0, 0.2, scheme=mural)
    fold_run(tmp_path / "m1", 1, 0.4, scheme=mural)
    result = run_script("train.py", "--summary", tmp_path / "m0", tmp_path / "m1")
    assert result.returncode == 0, result.stderr
    rows = [line.split(" |")[0] for line in result.stdout.splitlines() if line.startswith("| iou/")]
    assert rows == ["| iou/clean", "| iou/crack", "| iou/stain"]
    renamed = scheme_from_dict(dict(scheme_to_dict(mural), classes=[
        {"id": 0, "name": "clean", "colour": "#000000"}, {"id": 1, "name": "crack", "colour": "#FF0000"},
        {"id": 2, "name": "loss", "colour": "#00FF00"}]), "renamed")
    fold_run(tmp_path / "r", 2, 0.3, scheme=renamed)
    result = run_script("train.py", "--summary", tmp_path / "m0", tmp_path / "r")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert f"{tmp_path / 'r' / 'config.json'}: another label scheme than" in result.stderr
    assert "class 2 'loss' vs 'stain'" in result.stderr
    # Runs from before configs carried a scheme were ARTeFACT's: they summarise with ARTeFACT runs, with a note.
    fold_run(tmp_path / "old", 1, 0.3, carries_scheme=False)
    fold_run(tmp_path / "new", 0, 0.2)
    result = run_script("train.py", "--summary", tmp_path / "new", tmp_path / "old")
    assert result.returncode == 0, result.stderr
    assert "records no label scheme" in result.stderr and "| iou/Burn marks |" in result.stdout


def test_progress_lines_split_data_from_step_time_and_reach_the_run_log(synthetic_root, tmp_path):
    done = run_script(*tiny(synthetic_root, tmp_path, "--epochs", "1", "--log-every", "1"))
    assert done.returncode == 0, done.stderr
    pattern = (r"  \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] epoch 1 step (\d)/3 loss \d+\.\d+ lr (\d\.\d\de-\d\d) "
               r"\d+\.\d img/s data (\d+) ms/step step (\d+) ms/step peak \d+ MB epoch ETA \d+:\d\d:\d\d")
    lines = re.findall(pattern, done.stdout)
    assert [line[0] for line in lines] == ["1", "2"], done.stdout
    assert re.search(pattern, (tmp_path / "train.log").read_text())
    # The LR shown is the one the step used next: OneCycle's at steps 1 and 2 of 3.
    lr = config.resolve_config(config.parse_args(tiny(synthetic_root, tmp_path)[1:]), 1, torch.device("cpu"))["lr"]
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    reference = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=lr, total_steps=3, pct_start=0.3)
    for line in lines:
        sgd.step()
        reference.step()
        assert float(line[1]) == pytest.approx(reference.get_last_lr()[0], rel=5e-3)

