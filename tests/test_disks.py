"""Full and read-only disks, for real: small tmpfs mounts and read-only bind mounts (root only; skipped elsewhere).
Every writer ends in one `error:` line naming the folder (and, for a full disk, the space), and loses nothing."""
import io
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import files
import metrics
import prepare
import preload
import report
import runs
import train
import writes
from conftest import ROOT, tiny_flags
from labels import UserError, artefact_scheme


@pytest.fixture
def mounts(tmp_path):
    """mounts.tmpfs(size) -> a fresh tmpfs folder of that size; mounts.read_only(folder) -> a read-only view of it.
    Everything mounted is unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a read-only bind mount needs root")
    mounted = []

    def mount(*args, target):
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"mount is not available here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    def tmpfs(size):
        return mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", target=tmp_path / f"tmpfs{len(mounted)}")

    def read_only(folder):
        target = mount("--bind", str(folder), target=tmp_path / f"ro{len(mounted)}")
        mount("-o", "remount,bind,ro", target=target)
        return target

    yield types.SimpleNamespace(tmpfs=tmpfs, read_only=read_only)
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(folder, leave=0):
    """Fills folder's file system up to `leave` bytes (rounded to its pages) with one file."""
    with open(folder / "filler", "wb") as f:
        while writes.free_bytes(folder) > leave:
            try:
                f.write(b"\0" * max(4096, min(2**20, writes.free_bytes(folder) - leave)))
                f.flush()
            except OSError:
                break


def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_previous_one_stays(mounts):
    disk = mounts.tmpfs("3m")
    path = disk / "last.pt"
    checkpoint.save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(1000)}, "config": {}})
    big = {"epoch": 2, "model": {"w": torch.zeros(1_000_000)}, "config": {}}  # 3.8 MiB of tensors
    with pytest.raises(UserError) as raised:
        checkpoint.save_checkpoint(path, big)   # the real torch.save: a RuntimeError without an errno
    message = str(raised.value)
    assert message.startswith(f"{disk}: disk full writing last.pt (needs 3.8 MiB, ")
    assert "MiB free); free space and rerun with --resume (the previous last.pt, if any, is intact)" in message
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in disk.iterdir()) == ["last.pt"], "no temporary is left behind"


def test_a_disk_that_fills_during_a_run_ends_it_in_one_line_and_resume_after_freeing_space_finishes_it(
        synthetic_root, finished_run, mounts, capsys):
    disk = mounts.tmpfs("100m")  # room for config, records and best.pt (64 MiB), not for last.pt beside it
    run_dir = disk / "run"
    assert train.main(tiny_flags(synthetic_root, run_dir)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("preload:")]
    assert len(err) == 1 and err[0].startswith(f"error: {run_dir}: disk full writing last.pt (needs "), err
    assert "Traceback" not in " ".join(err)
    subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
    assert train.main(tiny_flags(synthetic_root, run_dir, "--resume")) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test"] == [json.loads(line) for line in
                                   (finished_run / "metrics.jsonl").read_text().splitlines()][-1]["test"]


def test_a_record_that_does_not_fit_is_not_written_at_all(mounts):
    disk = mounts.tmpfs("1m")
    path = disk / "metrics.jsonl"
    for epoch in (1, 2):
        writes.append_line(path, json.dumps({"epoch": epoch}))
    before = path.read_bytes()
    fill(disk, leave=8192)
    # Larger than what is left: the kernel writes part of it (a short write), which must not stay.
    with pytest.raises(UserError, match=rf"{disk}: disk full writing metrics.jsonl \(needs 98 KiB, "):
        writes.append_line(path, json.dumps({"epoch": 3, "pad": "x" * 100_000}))
    assert path.read_bytes() == before


def test_resume_report_and_summary_survive_a_torn_last_line(synthetic_root, finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    whole = (run_dir / "metrics.jsonl").read_text()
    torn = whole + whole.splitlines(keepends=True)[0][:40]  # what a kill inside an older append left
    (run_dir / "metrics.jsonl").write_text(torn)
    assert report.read_records(run_dir) == [json.loads(line) for line in whole.splitlines()]
    assert "dropped its torn last line 4" in capsys.readouterr().err
    assert metrics.summary([run_dir]).count("| miou |") == 1
    assert train.main(tiny_flags(synthetic_root, run_dir, "--resume")) == 0
    assert (run_dir / "metrics.jsonl").read_text() == whole
    # A broken line before the end is not a torn write: it is named, not skipped.
    (run_dir / "metrics.jsonl").write_text("{\n" + whole)
    with pytest.raises(UserError, match="line 1 is not JSON"):
        report.read_records(run_dir)


def test_a_run_starting_on_a_full_disk_is_one_line_and_leaves_no_folder(synthetic_root, mounts, capsys):
    disk = mounts.tmpfs("256k")
    fill(disk)
    code = train.main(tiny_flags(synthetic_root, disk / "run"))
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("preload:")]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {disk / 'run'}: disk full writing "), err
    assert not (disk / "run").exists()


def parquet_shard(folder, count, side=160):
    """A shard of count rows of noise images (incompressible: ~75 KB each as PNG)."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    rows = {"id": [], "image": [], "annotation": []}
    for i in range(count):
        image, mask = io.BytesIO(), io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(image, format="PNG")
        Image.fromarray(np.zeros((side, side), np.uint8)).save(mask, format="PNG")
        rows["id"].append(f"img{i}")
        rows["image"].append({"bytes": image.getvalue()})
        rows["annotation"].append({"bytes": mask.getvalue()})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "shard.parquet")
    return folder


def test_ingest_on_a_full_disk_is_one_line_and_the_partial_folder_is_refused(tmp_path, mounts):
    shards = parquet_shard(tmp_path / "shards", 6)
    out = mounts.tmpfs("256k") / "artefact"
    with pytest.raises(UserError) as raised:
        prepare.prepare([shards], out)
    assert str(raised.value).startswith(f"{out / 'images'}: disk full writing img") and "rerun prepare.py ingest" \
        in str(raised.value)
    with pytest.raises(UserError, match=rf"{out}: an ingest into it did not finish .*--overwrite"):
        prepare.check(out)


def test_a_read_only_run_folder_with_resume_is_one_line(synthetic_root, finished_run, tmp_path, mounts, capsys):
    shutil.copytree(finished_run, tmp_path / "run")
    run_dir = mounts.read_only(tmp_path / "run")
    code = train.main(tiny_flags(synthetic_root, run_dir, "--resume"))
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err == [f"error: {run_dir}: read-only file system writing {runs.LOCK}; a run writes its "
                                 "checkpoints there: make it writable or pass another --run-dir"]


def test_a_read_only_or_full_shared_memory_folder_is_one_line(synthetic_root, tmp_path, mounts, monkeypatch):
    samples = files.list_samples(synthetic_root)
    (tmp_path / "shm").mkdir()
    monkeypatch.setenv("ARTDAMAGE_SHM_DIR", str(mounts.read_only(tmp_path / "shm")))
    with pytest.raises(UserError, match=r"read-only file system writing artdamage.lock; use --preload none, or point "
                                        r"ARTDAMAGE_SHM_DIR at a writable tmpfs folder"):
        preload.preload(samples, preload.RowFormat(64, artefact_scheme()))
    monkeypatch.setenv("ARTDAMAGE_SHM_DIR", str(mounts.tmpfs("64k")))
    with pytest.raises(UserError, match=r"preload needs \d+ KiB, \d+ KiB free; use --preload none"):
        preload.preload(samples, preload.RowFormat(64, artefact_scheme()))


def test_a_read_only_checkout_with_data_synthetic_is_one_line(tmp_path, mounts):
    checkout = mounts.read_only(ROOT)
    assert not (checkout / "data" / "synthetic-5-40").exists()
    done = subprocess.run([sys.executable, str(checkout / "train.py"), "--data", "synthetic", "--synthetic-count", "5",
                           "--synthetic-size", "40", "--img-size", "64", "--encoder", "mit_b0", "--run-dir",
                           str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: {checkout / 'data'}: read-only file system writing synthetic-5-40; --data synthetic generates its "
        f"images once under {checkout / 'data'}: make it writable, or run once from a writable checkout"], done.stderr


def test_a_report_onto_a_full_or_read_only_disk_is_one_line_and_the_run_is_untouched(finished_run, tmp_path,
                                                                                      mounts):
    before = {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()}
    full = mounts.tmpfs("40k")  # room for the folder, not for the pictures
    with pytest.raises(UserError) as refused:
        report.build_report([finished_run], full, images=1)
    assert str(refused.value).startswith(f"{full}: disk full writing ")
    assert str(refused.value).endswith(f"free space (or pass --out DIR) and rerun `python report.py {finished_run}`")
    (tmp_path / "shared" / "out").mkdir(parents=True)
    read_only = mounts.read_only(tmp_path / "shared") / "out"
    with pytest.raises(UserError, match=f"^{read_only}: read-only file system writing curves\\.png; free space"):
        report.build_report([finished_run], read_only, images=1)
    assert {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()} == before
