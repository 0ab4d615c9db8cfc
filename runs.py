"""The run folder: config.json, metrics.jsonl, summary.csv, last.pt / best.pt, confusion.json,
confusion_per_image.npz, run.json, class_weights.json, train.log and, with --tensorboard, tensorboard/.

A folder belongs to one train.py at a time (an exclusive lock held for the run's life) and one that holds
checkpoints is never overwritten: only --resume continues it. metrics.jsonl holds one record per epoch
({"epoch", "train_loss", "val": {...}, ...}) and, at the end, one {"test": {...}} record of the selected
checkpoint on the untouched test fold; confusion.json holds that evaluation's confusion matrices and
confusion_per_image.npz each test image's own; run.json what the run cost (parameters, GFLOPs, devices, time).
summary.csv is metrics.jsonl's epochs in timm's columns, for a spreadsheet or a plotting script.

The selection has one source of truth, best.pt itself (its own epoch and inner mIoU): it is written before
last.pt and metrics.jsonl's records claim it, and --resume takes the selection from the file on disk.
"""
import contextlib
import csv
import fcntl
import io
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint import (load_checkpoint, load_resumable, restore_training, resume_changes, save_checkpoint,
                        training_state)
from distributed import MAX, all_reduce
from labels import UserError
from logs import forward_gflops
from writes import append_line, atomic_write, read_jsonl, remove_stale_temporaries, write_error

LOCK = ".lock"


def log(rank, *parts):
    if rank == 0:
        print(*parts, flush=True)


class _Tee:
    """A text stream that writes to the console stream and the log file alike."""

    def __init__(self, stream, log_file):
        self.stream, self.log_file = stream, log_file

    def write(self, text):
        self.stream.write(text)
        self.log_only(text)
        return len(text)

    def log_only(self, text):
        self._to_log(lambda: self.log_file.write(text))

    def flush(self):
        self.stream.flush()
        self._to_log(self.log_file.flush)

    def _to_log(self, action):
        # A full disk must not end a run that is still checkpointing: the console keeps every line.
        if self.log_file is None:
            return
        try:
            action()
        except OSError as exc:
            name, self.log_file = self.log_file.name, None
            self.stream.write(f"note: {name}: {exc.strerror}; logging to the console only\n")

    def isatty(self):
        return self.stream.isatty()


@contextlib.contextmanager
def logged_to(path, rank):
    """Rank 0's stdout and stderr also go to path (appended, a resumed run continues it), so a plain torchrun
    run keeps a log like a SLURM job's; a user error that ends the run is logged there too."""
    if rank != 0:
        yield
        return
    try:
        log_file = open(path, "a", buffering=1)
    except OSError as exc:
        raise write_error(path, exc) or exc from None
    with log_file:
        streams, tee = (sys.stdout, sys.stderr), _Tee(sys.stdout, log_file)
        sys.stdout, sys.stderr = tee, _Tee(sys.stderr, log_file)
        try:
            yield
        except UserError as exc:
            tee.log_only(f"error: {exc}\n")
            raise
        finally:
            sys.stdout, sys.stderr = streams


def _lock(run_dir):
    """A descriptor holding an exclusive flock on run_dir/.lock, the holder's pid and host written in it. The kernel
    drops the lock when its holder dies, however it dies, so a killed run's lock never blocks the next one."""
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(path, exc, fix="a run writes its checkpoints there: make it writable or pass another "
                                         "--run-dir") or exc from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise UserError(f"--run-dir {run_dir}: in use by another train.py ({holder}); wait for it to finish, or "
                        "pass another --run-dir") from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def _has_checkpoint(run_dir):
    return any((run_dir / name).is_file() for name in ("last.pt", "best.pt"))


@contextlib.contextmanager
def run_folder(run_dir, rank):
    """The run folder for the run's life: created if needed and locked by rank 0 (every rank refuses together
    when it is another process's). A folder this run created is removed again if the run fails before its
    first checkpoint, so a failed start leaves no stub behind."""
    fd, created, refusal = None, False, None
    if rank == 0:
        try:
            created = not run_dir.exists()
            make_folder(run_dir, "--run-dir")
            fd = _lock(run_dir)
        except UserError as exc:
            refusal = exc
    if int(all_reduce(torch.tensor(int(refusal is not None)), MAX)):
        raise refusal or UserError(f"--run-dir {run_dir}: rank 0 could not take it (its error says why)")
    try:
        yield
    except BaseException:
        if created and not _has_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def make_folder(folder, flag):
    """mkdir -p, or one line naming the flag and why not (a file in the way, read-only, full)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot create the folder ({exc.strerror}); pass a writable folder") from None


def load_resume(cfg, run_dir, rank):
    """The checkpoint to resume from (last.pt, else best.pt), or None to start afresh; its best_miou and
    best_epoch are replaced by the selection verified on disk (see _verified_selection)."""
    if not cfg["resume"]:
        return None
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    source = Path(cfg["checkpoint"]) if cfg["checkpoint"] else last if last.is_file() else best
    if not source.is_file() and not cfg["checkpoint"]:
        _refuse_orphaned_records(run_dir)
        # A job pre-empted before its first epoch ended is requeued with --resume too: it starts afresh.
        log(rank, f"--resume: no {last} yet; starting from scratch")
        return None
    resume = load_resumable(source, cfg)
    if source == best and not cfg["checkpoint"]:
        # best.pt is a whole training state too: the epochs after it are trained again, nothing is deleted.
        log(rank, f"--resume: {last} is missing; continuing from {best} (epoch {resume['epoch']}), so the epochs "
                  "after it are trained again")
    resume["best_miou"], resume["best_epoch"] = _verified_selection(resume, source, run_dir, cfg)
    return resume


def _refuse_orphaned_records(run_dir):
    """A folder whose records outlived its checkpoints holds another run's history, never restarted over."""
    path = run_dir / "metrics.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    if any(r.get("epoch", 2) > 1 for r in records):
        raise UserError(f"--resume: {run_dir} has no last.pt or best.pt, but {path.name} records "
                        f"{sum('epoch' in r for r in records)} epochs of a run; restore its checkpoints, or pass a "
                        "fresh --run-dir (nothing was changed)")


def _verified_selection(resume, source, run_dir, cfg):
    """(inner mIoU, epoch) of the selection, read from best.pt itself. best.pt is written before last.pt, so it
    may be ahead of the checkpoint resumed (a kill between the two writes): that epoch is trained again, ties,
    and the file stays. A best.pt that is missing while the checkpoint claims one, belongs to another run, or
    disagrees otherwise is refused rather than trusted."""
    path = run_dir / "best.pt"
    claimed_miou, claimed_epoch = resume["best_miou"], resume.get("best_epoch")
    if Path(source).resolve() == path.resolve():
        return resume["best_miou"], resume["epoch"]
    # Checkpoints written before best_epoch existed claim a selection by a best score above the initial -1.
    claims = claimed_epoch is not None or ("best_epoch" not in resume and claimed_miou > -1)
    if not path.is_file():
        if claims:
            raise UserError(f"--resume: {source} selected epoch {claimed_epoch or '?'} (inner mIoU "
                            f"{claimed_miou:.4f}) but {path} is missing; restore it, or start a fresh --run-dir")
        return claimed_miou, claimed_epoch
    selected = load_checkpoint(path)
    changes = resume_changes(selected["config"], cfg)
    if changes:
        raise UserError(f"--resume: {path} is another run's ({'; '.join(changes)}); restore this run's best.pt, or "
                        "start a fresh --run-dir")
    agrees = selected["epoch"] == claimed_epoch or (claimed_epoch is None and selected["best_miou"] == claimed_miou)
    if not (agrees or selected["epoch"] > resume["epoch"]):
        raise UserError(f"--resume: {path} holds epoch {selected['epoch']} but {source} selected epoch "
                        f"{claimed_epoch or '?'} (inner mIoU {claimed_miou:.4f}); pass --checkpoint {path} to "
                        "continue from the epoch best.pt holds, or start a fresh --run-dir")
    return selected["best_miou"], selected["epoch"]


def prepare_run_dir(cfg, run_dir, resume, rank):
    """Never overwrites an earlier run's checkpoints; a fresh start begins a fresh metrics.jsonl."""
    earlier = [name for name in ("last.pt", "best.pt") if (run_dir / name).is_file()]
    if earlier and not cfg["resume"]:
        raise UserError(f"--run-dir {run_dir}: holds {' and '.join(earlier)} of an earlier run; pass --resume to "
                        "continue it, or a fresh --run-dir to start another")
    if rank == 0:
        remove_stale_temporaries(run_dir)
        if resume is None:
            atomic_write(run_dir / "metrics.jsonl", lambda tmp: tmp.write_text(""))
        write_config(cfg, run_dir)


def interrupted_line(cfg):
    """What a Ctrl-C leaves behind, in one line instead of a KeyboardInterrupt traceback."""
    last = Path(cfg["run_dir"]) / "last.pt" if cfg and not cfg["eval_only"] else None
    if last is not None and last.is_file():
        return f"interrupted; finished epochs are in {last}, rerun with --resume to continue"
    return "interrupted" + ("; no epoch had finished, nothing was saved" if last is not None else "")


def write_config(cfg, run_dir):
    """config.json: the run's resolved flags (rewritten when --batch-size auto has found the batch)."""
    atomic_write(Path(run_dir) / "config.json", lambda tmp: tmp.write_text(json.dumps(cfg, indent=2)))


def restore(parts, resume, run_dir, rank):
    """Loads the resumed states; keeps the metrics records of the epochs the checkpoint holds (a kill between a
    record and its checkpoint must not leave a duplicate behind, a torn last line is dropped) and drops a test
    record, which is redone. Returns (epoch, step, (best mIoU, best epoch), epoch loss sum)."""
    progress = restore_training(parts, resume)
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0 and metrics_path.is_file():
        kept = [r for r in read_jsonl(metrics_path) if r.get("epoch", resume["epoch"] + 1) <= resume["epoch"]
                and "test" not in r]
        atomic_write(metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        write_summary_csv(run_dir)
    log(rank, f"resumed {run_dir} at epoch {resume['epoch'] + 1} step {resume['step']}")
    return progress


def append_record(run_dir, record):
    append_line(Path(run_dir) / "metrics.jsonl", json.dumps(record),
                fix="free space and rerun with --resume (the finished epochs are in last.pt)")


def save_epoch(parts, cfg, record, best, run_dir):
    """Rank 0: the epoch's metrics record, best.pt when best = (mIoU, epoch) selects this epoch, then last.pt.
    best.pt comes first, so last.pt never claims a selection that is not on disk yet."""
    append_record(run_dir, record)
    write_summary_csv(run_dir)
    state = training_state(parts, cfg, record["epoch"], 0, best)
    if best[1] == record["epoch"]:
        save_checkpoint(run_dir / "best.pt", state)
    save_checkpoint(run_dir / "last.pt", state)


def save_preempted(parts, run, epoch, step, best, partial_loss):
    """Rank 0 writes last.pt in the run folder where the pre-emption hit; --resume continues from there."""
    run_dir = Path(run.cfg["run_dir"])
    if run.rank == 0:
        save_checkpoint(run_dir / "last.pt", training_state(parts, run.cfg, epoch, step, best, partial_loss))
    log(run.rank, f"SIGTERM: saved {run_dir / 'last.pt'} at epoch {epoch + 1} step {step}; "
              "rerun with --resume to continue")


def save_test(run_dir, record, confusion, ids, per_image):
    """Rank 0: the test record in metrics.jsonl, its confusion matrices (rows truth, columns prediction) in
    confusion.json and each test image's fine matrix in confusion_per_image.npz, so any table, picture or
    bootstrap can be recomputed without a GPU."""
    append_record(run_dir, record)
    payload = {"split": "test", "epoch": record["selected_epoch"], **confusion}
    atomic_write(Path(run_dir) / "confusion.json", lambda tmp: tmp.write_text(json.dumps(payload)))
    write_per_image(per_image_path(Path(run_dir) / "confusion.json"), ids, per_image)


def per_image_path(path):
    """Where the per-image matrices of an evaluation file live: confusion.json -> confusion_per_image.npz,
    eval-test-fullres.json -> eval-test-fullres_per_image.npz."""
    path = Path(path)
    return path.with_name(f"{path.stem}_per_image.npz")


def write_per_image(path, ids, matrices):
    """ids (image ids) and their C x C fine matrices (int64, rows truth) as one compressed .npz."""
    matrices = np.asarray(matrices.cpu() if isinstance(matrices, torch.Tensor) else matrices, dtype=np.int64)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, ids=np.array(ids, dtype=str), confusion=matrices)
    atomic_write(path, write)


def read_per_image(path):
    """(ids, (images, C, C) int64 matrices) of a file write_per_image wrote; one line naming it if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as f:
            ids, matrices = [str(i) for i in f["ids"]], f["confusion"].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: unreadable per-image confusion matrices ({exc}); score the checkpoint again with "
                        "train.py --eval-only") from None
    if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2] or len(ids) != len(matrices):
        raise UserError(f"{path}: holds {len(ids)} ids and matrices of shape {matrices.shape}, expected one C x C "
                        "matrix per id; score the checkpoint again with train.py --eval-only")
    return ids, matrices


def save_run_summary(run_dir, model, cfg, world, test_seconds):
    """Rank 0: run.json, what the run cost: the network's parameters and forward GFLOPs per --img-size crop (as the
    run's header counts them), the devices (world ranks, one device each), and the seconds of its epochs (training
    and inner validation, from metrics.jsonl, so a resumed run counts every epoch once) and of its test evaluation;
    start-up, preloading and work lost to a pre-emption are not counted. GPU-hours are devices x those seconds."""
    records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    train_seconds = sum(r["epoch_time_s"] for r in records if "epoch" in r)
    wall = train_seconds + test_seconds
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    gflops = forward_gflops(model, cfg["img_size"], device, cfg["channels_last"])
    summary = {"params": params, "gflops": gflops, "img_size": cfg["img_size"], "world_size": world,
               "device": device.type,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "train_seconds": train_seconds, "test_seconds": test_seconds, "wall_seconds": wall,
               "gpu_hours": world * wall / 3600 if device.type == "cuda" else None}
    atomic_write(Path(run_dir) / "run.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))


# timm's summary.csv columns: epoch, train_*, eval_* (here the inner validation), lr (the schedule's LR at
# scale 1; a parameter group's is this x its lr_scale).
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_miou", "eval_binary_iou", "lr")


def summary_rows(records):
    """summary.csv's rows of metrics.jsonl records: one per epoch; eval_* blank without an inner validation
    (--select last) or where the score is undefined."""
    rows = []
    for record in (r for r in records if "epoch" in r):
        val = record.get("val", {})
        rows.append({"epoch": record["epoch"], "train_loss": record["train_loss"], "eval_miou": val.get("miou"),
                     "eval_binary_iou": val.get("binary_iou"), "lr": record["lr"]})
    return rows


def write_summary_csv(run_dir):
    """summary.csv from metrics.jsonl, rewritten whole, so a resumed run's stays equal to its metrics."""
    records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    text = io.StringIO()
    writer = csv.DictWriter(text, SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_rows(records))  # None is written as an empty cell
    atomic_write(Path(run_dir) / "summary.csv", lambda tmp: tmp.write_text(text.getvalue()))


def tensorboard_writer(cfg, run_dir, rank, first_epoch):
    """Rank 0's TensorBoard writer into RUN_DIR/tensorboard with --tensorboard, else None; without the package,
    one note line and None. A resumed run drops the events of epochs after its checkpoint (purge_step)."""
    if not cfg["tensorboard"] or rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: --tensorboard: the tensorboard package is not installed (pip install tensorboard); the run "
              "logs to metrics.jsonl and summary.csv only", file=sys.stderr, flush=True)
        return None
    return SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=first_epoch + 1 if first_epoch else None)


def write_scalars(writer, record):
    """An epoch or test record's numbers as TensorBoard scalars at its epoch (the selected one for the test)."""
    if writer is None:
        return
    if "test" in record:
        step, values = record["selected_epoch"], {"test/miou": record["test"]["miou"],
                                                  "test/binary_iou": record["test"].get("binary_iou")}
    else:
        step = record["epoch"]
        values = {"train/loss": record["train_loss"], "train/lr": record["lr"], "train/img_s": record["img_s"],
                  "train/peak_mem_mb": record["peak_mem_mb"], "val/miou": record.get("val", {}).get("miou"),
                  "val/binary_iou": record.get("val", {}).get("binary_iou")}
    for tag, value in values.items():
        if value is not None:
            writer.add_scalar(tag, value, step)
    writer.flush()
