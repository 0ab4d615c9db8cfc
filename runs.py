"""The run folder: config.json, metrics.jsonl, last.pt / best.pt, confusion.json, confusion_per_image.npz,
run.json, class_weights.json.

A folder that holds checkpoints is never overwritten: only --resume continues it. metrics.jsonl holds one
record per epoch ({"epoch", "train_loss", "val": {...}, ...}) and, at the end, one {"test": {...}} record of the
selected checkpoint on the untouched test fold; confusion.json holds that evaluation's confusion matrices and
confusion_per_image.npz each test image's own; run.json what the run cost (parameters, GFLOPs, devices, time).
"""
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint import load_resumable, restore_training, save_checkpoint, training_state
from files import atomic_write, remove_stale_temporaries
from labels import UserError
from model import model_cost


def log(rank, *parts):
    if rank == 0:
        print(*parts, flush=True)


class _Tee:
    """A text stream that writes to the console stream and the log file alike."""

    def __init__(self, stream, log_file):
        self.stream, self.log_file = stream, log_file

    def write(self, text):
        self.stream.write(text)
        self.log_file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log_file.flush()

    def isatty(self):
        return self.stream.isatty()


@contextlib.contextmanager
def logged_to(path, rank):
    """Rank 0's stdout and stderr also go to path (appended, a resumed run continues it), so a plain torchrun
    run keeps a log like a SLURM job's; a user error that ends the run is logged there too."""
    if rank != 0:
        yield
        return
    with open(path, "a", buffering=1) as log_file:
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, log_file), _Tee(sys.stderr, log_file)
        try:
            yield
        except UserError as exc:
            log_file.write(f"error: {exc}\n")
            raise
        finally:
            sys.stdout, sys.stderr = streams


def load_resume(cfg, run_dir, rank):
    """The checkpoint to resume from, or None to start afresh."""
    path = Path(cfg["checkpoint"] or run_dir / "last.pt")
    if not cfg["resume"]:
        return None
    if not cfg["checkpoint"] and not path.is_file():
        # A job pre-empted before its first epoch ended is requeued with --resume too: it starts afresh.
        log(rank, f"--resume: no {path} yet; starting from scratch")
        return None
    return load_resumable(path, cfg)


def prepare_run_dir(cfg, run_dir, resume, rank):
    """Never overwrites an earlier run's checkpoints; a fresh start begins a fresh metrics.jsonl."""
    earlier = [name for name in ("last.pt", "best.pt") if (run_dir / name).is_file()]
    if earlier and not cfg["resume"]:
        raise UserError(f"--run-dir {run_dir}: holds {' and '.join(earlier)} of an earlier run; pass --resume to "
                        "continue it, or a fresh --run-dir to start another")
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--run-dir {run_dir}: cannot create it ({exc.strerror}); pass a writable folder") from None
        remove_stale_temporaries(run_dir)
        if resume is None:
            (run_dir / "metrics.jsonl").write_text("")
        write_config(cfg, run_dir)


def write_config(cfg, run_dir):
    """config.json: the run's resolved flags (rewritten when --batch-size auto has found the batch)."""
    atomic_write(Path(run_dir) / "config.json", lambda tmp: tmp.write_text(json.dumps(cfg, indent=2)))


def restore(parts, resume, run_dir, rank):
    """Loads the resumed states; keeps the metrics records of the epochs the checkpoint holds (a kill between a
    record and its checkpoint must not leave a duplicate behind) and drops a test record, which is redone."""
    progress = restore_training(parts, resume)
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0 and metrics_path.is_file():
        lines = metrics_path.read_text().splitlines(keepends=True)
        metrics_path.write_text("".join(line for line in lines
                                        if json.loads(line).get("epoch", resume["epoch"] + 1) <= resume["epoch"]
                                        and "test" not in json.loads(line)))
    log(rank, f"resumed {run_dir} at epoch {resume['epoch'] + 1} step {resume['step']}")
    return progress


def append_record(run_dir, record):
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def save_epoch(parts, cfg, record, selected, run_dir):
    """Rank 0: the epoch's metrics record and last.pt; best.pt too when this epoch is the one selected."""
    append_record(run_dir, record)
    state = training_state(parts, cfg, record["epoch"], 0, record["best_val_miou"])
    save_checkpoint(run_dir / "last.pt", state)
    if selected:
        save_checkpoint(run_dir / "best.pt", state)


def save_preempted(parts, cfg, run_dir, epoch, step, best, partial_loss, rank):
    """Rank 0 writes last.pt where the pre-emption hit; --resume continues from there."""
    if rank == 0:
        save_checkpoint(run_dir / "last.pt", training_state(parts, cfg, epoch, step, best, partial_loss))
    log(rank, f"SIGTERM: saved {run_dir / 'last.pt'} at epoch {epoch + 1} step {step}; "
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
    """Rank 0: run.json, what the run cost: the network's parameters and forward GFLOPs per --img-size crop
    (model.model_cost), the devices (world ranks, one device each), and the seconds of its epochs (training and
    inner validation, from metrics.jsonl, so a resumed run counts every epoch once) and of its test evaluation;
    start-up, preloading and work lost to a pre-emption are not counted. GPU-hours are devices x those seconds."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    train_seconds = sum(r["epoch_time_s"] for r in records if "epoch" in r)
    wall = train_seconds + test_seconds
    params, gflops = model_cost(model, cfg["img_size"], cfg["channels_last"])
    device = next(model.parameters()).device
    summary = {"params": params, "gflops": gflops, "img_size": cfg["img_size"], "world_size": world,
               "device": device.type,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "train_seconds": train_seconds, "test_seconds": test_seconds, "wall_seconds": wall,
               "gpu_hours": world * wall / 3600 if device.type == "cuda" else None}
    atomic_write(Path(run_dir) / "run.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
