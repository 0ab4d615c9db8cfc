"""A run folder's state under real faults: a kill inside the best.pt write, a missing last.pt, a resume with other
flags, two processes on one folder, Ctrl-C. Each compares with the uninterrupted run or with the files as they were."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import files
import runs
import train
from conftest import ROOT, module_folder, run_script, tiny_flags

# torch.save as train.py calls it, except that the kill_at-th write of best.pt stops half-way: the process
# SIGKILLs itself with half the file on disk, as a kill (OOM, node failure) inside the write would leave it.
KILL_INSIDE_BEST_PT = """
import os, signal, sys
import torch
writes, kill_at, real_save = [0], int(sys.argv[1]), torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if ".best.pt.tmp" in getattr(f, "name", str(f)):
        writes[0] += 1
        if writes[0] == kill_at:
            f.flush()
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.path.insert(0, os.getcwd())
import train
sys.argv = ["train.py", *sys.argv[2:]]
sys.exit(train.main())
"""


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scored_test(run_dir):
    tests = [r for r in records(run_dir) if "test" in r]
    assert len(tests) == 1, "the test fold is scored once"
    return tests[0]


def epoch_of(path):
    return torch.load(path, weights_only=True)["epoch"]


def one_line_error(code, captured):
    lines = [line for line in captured.err.splitlines() if not line.startswith(("preload:", "synthetic set"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_a_kill_inside_the_best_pt_write_leaves_the_selection_of_the_uninterrupted_run(synthetic_root, finished_run,
                                                                                      tmp_path):
    straight = records(finished_run)
    best, improvements = -1.0, []
    for record in (r for r in straight if "epoch" in r):
        if record["val"]["miou"] > best:
            best, improvements = record["val"]["miou"], improvements + [record["epoch"]]
    assert len(improvements) >= 2, "the case needs an earlier best.pt that the killed write would replace"
    run_dir = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_INSIDE_BEST_PT, str(len(improvements)),
                             *tiny_flags(synthetic_root, run_dir)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Nothing on disk claims the epoch whose best.pt never finished.
    assert epoch_of(run_dir / "best.pt") == improvements[-2]
    assert epoch_of(run_dir / "last.pt") == improvements[-1] - 1
    resumed = run_script("train.py", *tiny_flags(synthetic_root, run_dir, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert scored_test(run_dir)["selected_epoch"] == scored_test(finished_run)["selected_epoch"] == improvements[-1]
    assert scored_test(run_dir)["test"] == scored_test(finished_run)["test"]
    assert [r["val"] for r in records(run_dir) if "epoch" in r] == [r["val"] for r in straight if "epoch" in r]
    assert not list(run_dir.glob(".*.tmp*")), "the half-written best.pt is cleaned up"


def test_resume_without_last_pt_continues_from_best_pt_and_deletes_nothing(synthetic_root, finished_run, tmp_path,
                                                                          capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "last.pt").unlink()
    best = (run_dir / "best.pt").read_bytes()
    assert train.main(tiny_flags(synthetic_root, run_dir, "--resume")) == 0
    assert "last.pt is missing; continuing from" in capsys.readouterr().out
    assert (run_dir / "best.pt").read_bytes() == best
    assert records(run_dir) == records(finished_run)

    (run_dir / "best.pt").unlink()
    before = (run_dir / "metrics.jsonl").read_bytes()
    line = one_line_error(train.main(tiny_flags(synthetic_root, run_dir, "--resume")), capsys.readouterr())
    assert "no last.pt or best.pt" in line and "2 epochs" in line and "nothing was changed" in line
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_a_best_pt_that_disagrees_with_last_pt(synthetic_root, finished_run, tmp_path, capsys):
    # What an older version left when killed inside best.pt: last.pt selects epoch 2, best.pt still holds epoch 1.
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    state = torch.load(run_dir / "best.pt", weights_only=True)
    torch.save(dict(state, epoch=1, best_epoch=1), run_dir / "best.pt")
    line = one_line_error(train.main(tiny_flags(synthetic_root, run_dir, "--resume")), capsys.readouterr())
    assert f"{run_dir / 'best.pt'} holds epoch 1 but {run_dir / 'last.pt'} selected epoch 2" in line
    assert f"--checkpoint {run_dir / 'best.pt'}" in line


@pytest.fixture(scope="module")
def own_data_run(request, synthetic_root, finished_run, tmp_path_factory):
    """A copy of the finished run whose checkpoint records a dataset of its own (a copy of the synthetic set),
    which a test may then change under the same path."""
    with module_folder(request, tmp_path_factory, "own") as base:
        data_root, run_dir = base / "data", base / "run"
        shutil.copytree(synthetic_root, data_root)
        shutil.copytree(finished_run, run_dir)
        state = torch.load(run_dir / "last.pt", weights_only=True)
        state["config"] = dict(state["config"], data=str(data_root), data_fingerprint=files.fingerprint(data_root))
        torch.save(state, run_dir / "last.pt")
        torch.save(state, run_dir / "best.pt")
        yield data_root, run_dir


# Each flag that changes what is trained or evaluated, changed on --resume: (flags, the words of the refusal).
CHANGED = [
    (["--loss", "focal"], "--loss dicefocal -> focal"),
    (["--work-size", "512"], "--work-size 1024 -> 512"),
    (["--class-weights", "inverse"], "--class-weights inverse_sqrt_log_scaled -> inverse"),
    (["--rare-crops", "0.2"], "--rare-crops 0.5 -> 0.2"),
    (["--lr", "0.01"], "--lr 0.001 -> 0.01"),
    (["--folds", "4"], "--folds 3 -> 4"),
    (["--select", "last"], "--select inner -> last"),
    (["--synthetic-count", "32"], "--synthetic-count 64 -> 32"),
    (["--offline-aug"], "--offline-aug False -> True"),
    (["--norm", "bn"], "--norm gn -> bn"),
]


def test_resume_refuses_every_changed_flag_in_one_line_before_any_training(own_data_run, synthetic_root, capsys):
    data_root, run_dir = own_data_run
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "config.json")}
    flags = tiny_flags(data_root, run_dir, "--resume")
    cases = CHANGED + [(["--data", str(synthetic_root)], f"--data {data_root} -> {synthetic_root}")]
    for extra, words in cases:
        code = train.main(flags + extra)  # a flag given twice takes its last value
        captured = capsys.readouterr()
        line = one_line_error(code, captured)
        assert line.startswith(f"error: --resume: {run_dir / 'last.pt'} was trained with other settings") and \
            words in line, (extra, line)
        assert "epoch" not in captured.out, "refused before any training"
    assert {name: (run_dir / name).read_bytes() for name in before} == before

    # The same path with other content: one mask re-exported (new bytes, same name).
    mask = sorted((data_root / "annotations").iterdir())[0]
    mask.write_bytes(mask.read_bytes() + b"\0")
    line = one_line_error(train.main(flags), capsys.readouterr())
    assert "the files of --data" in line


def held_by_someone(lock_path):
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_run_folder_belongs_to_one_process_and_a_dead_holders_lock_does_not_block(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", *tiny_flags(synthetic_root, run_dir, "--epochs", "40")]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not held_by_someone(run_dir / runs.LOCK) and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert held_by_someone(run_dir / runs.LOCK), "the first run took no lock"
        # A stopped process keeps its lock; stopping it leaves the two cores to the contenders.
        first.send_signal(signal.SIGSTOP)
        contenders = [subprocess.Popen(command + extra, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True) for extra in ([], ["--resume"])]
        for contender in contenders:
            _, err = contender.communicate(timeout=120)
            assert contender.returncode == 2 and err.splitlines() == [
                f"error: --run-dir {run_dir}: in use by another train.py (pid {first.pid} on {os.uname().nodename}); "
                "wait for it to finish, or pass another --run-dir"], err
        assert first.poll() is None, "the first run is untouched"
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the dead holder's lock: the next run takes the folder.
    assert not held_by_someone(run_dir / runs.LOCK)
    os.close(runs._lock(run_dir))


def test_ctrl_c_prints_one_line_and_exits_130_with_finished_epochs_kept(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    # Six epochs: the interrupt sent after the first must land before the run could finish on a loaded machine.
    # A shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: the
    # child gets the default disposition back, as in the terminal a user presses Ctrl-C in.
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_flags(synthetic_root, run_dir, "--epochs", "6")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    printed = []
    for line in proc.stdout:
        if "epoch 1/6 loss" in line:
            printed.append(line)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    printed += [line for line in out.splitlines() if "/6 loss" in line]
    lines = [line for line in err.splitlines() if not line.startswith("preload:")]
    assert proc.returncode == 130 and lines == [
        f"interrupted; finished epochs are in {run_dir / 'last.pt'}, rerun with --resume to continue"], err
    assert 1 <= epoch_of(run_dir / "last.pt") == len(printed) < 6, "last.pt holds the last epoch that finished"


def test_a_failed_start_leaves_no_stub_folder_and_a_non_manifest_splits_file_is_named_not_deleted(
        synthetic_root, finished_run, tmp_path, capsys):
    run_dir = tmp_path / "new-run"
    not_a_manifest = finished_run / "config.json"
    line = one_line_error(train.main(tiny_flags(synthetic_root, run_dir, "--splits", str(not_a_manifest))),
                          capsys.readouterr())
    assert line.startswith(f"error: {not_a_manifest}: not a split manifest") and "delete" not in line
    assert not run_dir.exists(), "the folder this failed start created is gone again"
    assert not_a_manifest.is_file()
    line = one_line_error(train.main(tiny_flags(synthetic_root, run_dir, "--batch-size", "32")),
                          capsys.readouterr())
    assert "--batch-size 32: larger than the 14 training images" in line and not run_dir.exists()


def test_eval_only_refuses_a_fold_other_than_the_checkpoints(finished_run, capsys):
    code = train.main(["--eval-only", "--checkpoint", str(finished_run / "best.pt"), "--fold", "2"])
    line = one_line_error(code, capsys.readouterr())
    assert "--fold 2 (trained with 0)" in line and "another fold's test images" in line
