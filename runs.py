"""The run folder: config.json, metrics.jsonl, summary.csv, last.pt / best.pt, confusion.json,
class_weights.json, train.log and, with --tensorboard, tensorboard/.

A folder that holds checkpoints is never overwritten: only --resume continues it. metrics.jsonl holds one
record per epoch ({"epoch", "train_loss", "val": {...}, ...}) and, at the end, one {"test": {...}} record of the
selected checkpoint on the untouched test fold; confusion.json holds that evaluation's confusion matrices.
summary.csv is metrics.jsonl's epochs in timm's columns, for a spreadsheet or a plotting script.
"""
import contextlib
import csv
import io
import json
import sys
from pathlib import Path

from checkpoint import load_resumable, restore_training, save_checkpoint, training_state
from files import atomic_write, remove_stale_temporaries
from labels import UserError


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
        write_summary_csv(run_dir)
    log(rank, f"resumed {run_dir} at epoch {resume['epoch'] + 1} step {resume['step']}")
    return progress


def append_record(run_dir, record):
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def save_epoch(parts, cfg, record, selected, run_dir):
    """Rank 0: the epoch's metrics record and last.pt; best.pt too when this epoch is the one selected."""
    append_record(run_dir, record)
    write_summary_csv(run_dir)
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


def save_test(run_dir, record, confusion):
    """Rank 0: the test record in metrics.jsonl and its confusion matrices (rows truth, columns prediction) in
    confusion.json, so any table or picture can be recomputed without a GPU."""
    append_record(run_dir, record)
    payload = {"split": "test", "epoch": record["selected_epoch"], **confusion}
    atomic_write(Path(run_dir) / "confusion.json", lambda tmp: tmp.write_text(json.dumps(payload)))


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
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
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
