"""Checkpoint <-> model, one home for training, evaluation and predict.py.

A checkpoint is a dict of plain values (tensors, dicts, lists, numbers, strings): model, optimizer,
scheduler and scaler states, epoch, step, best metric and the full run config. It is read with
``torch.load(weights_only=True)``, so a file from elsewhere cannot run code.
"""
import errno
import shutil
import zipfile
from pathlib import Path

import torch

from files import atomic_write
from labels import NUM_CLASSES, UserError
from model import build_model, strip_wrapper_prefixes

# Config keys that decide the network's shape: a model is rebuilt from these alone.
MODEL_KEYS = ("encoder", "decoder", "heads", "norm", "img_size", "num_classes")


def _tensor_bytes(value):
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def save_checkpoint(path, state):
    """Written atomically (temporary file + rename): a kill mid-write or a full disk leaves the previous
    checkpoint intact; a full disk is a UserError naming the folder and the space needed."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write as RuntimeError wrapping the OS error.
        if not (getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)):
            raise
        free = shutil.disk_usage(path.parent).free
        raise UserError(f"{path.parent}: disk full writing {path.name} (needs about "
                        f"{_tensor_bytes(state) / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free); free space and "
                        f"rerun with --resume (the previous {path.name}, if any, is intact)") from None


def load_checkpoint(path, flag="--checkpoint"):
    """The checkpoint dict of a train.py run; anything else is a UserError naming flag and file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found; give the best.pt or last.pt of a training run")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{flag} {path}: not a PyTorch checkpoint (not a torch.save zip archive); pass a best.pt "
                        "or last.pt written by train.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise UserError(f"{flag} {path}: holds Python objects besides tensors and plain values, which are "
                            "not unpickled (they could run code); pass a best.pt or last.pt written by "
                            "train.py") from None
        raise UserError(f"{flag} {path}: not a readable PyTorch checkpoint (torch.load raised "
                        f"{type(exc).__name__}); pass a best.pt or last.pt written by train.py") from None
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or "encoder" not in config or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"{flag} {path}: not a train.py checkpoint (expected a dict with 'model' and a "
                        "'config' naming the encoder); pass a best.pt or last.pt written by train.py")
    return checkpoint


def model_from_checkpoint(checkpoint, path, img_size=None):
    """The network its config describes, with the checkpoint's weights (on the CPU, train mode)."""
    config = checkpoint["config"]
    num_classes = config.get("num_classes", NUM_CLASSES)
    if num_classes != NUM_CLASSES:
        raise UserError(f"--checkpoint {path}: model has {num_classes} classes, ARTeFACT has {NUM_CLASSES}; "
                        "pass a checkpoint trained on the ARTeFACT labels")
    model = build_model(config["encoder"], num_classes=num_classes, decoder=config.get("decoder", "unet"),
                        heads=config.get("heads", "fine"), pretrained=False,
                        img_size=img_size or config.get("img_size", 384), norm=config.get("norm", "bn"))
    try:
        model.load_state_dict(strip_wrapper_prefixes(checkpoint["model"]))
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"--checkpoint {path}: weights do not fit the model its config describes ({reason}); "
                        "pass the matching --img-size or an unmodified checkpoint") from None
    return model


def training_state(parts, cfg, epoch, step, best, loss_sum=0.0):
    """Everything --resume needs: states of model, optimizer, scheduler and scaler, progress, config."""
    return {"model": parts.raw_model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(), "epoch": epoch,
            "step": step, "epoch_loss_sum": loss_sum, "best_miou": best, "config": cfg}


# Config keys a resumed run may change: how it is launched, logged and checked, not what it trains or evaluates
# (the global batch's objective does not depend on the number of ranks or micro-batches). Every other key of
# the config must match, so a flag added later is covered without being listed here.
RESUME_MAY_CHANGE = {"run_dir", "checkpoint", "resume", "dry_run", "summary", "log_every", "dist_timeout",
                     "dist_backend", "threads", "no_report", "preload", "world_size", "per_rank_batch", "micro_batch",
                     "accum_steps", "device", "eval_only", "eval_split", "full_res", "data_flag", "batch_auto",
                     "skip_nonfinite", "max_skipped", "device_data"}
# Derived from other keys that are compared themselves (lr from --lr and the batch).
RESUME_DERIVED = {"lr"}
FLAG_OF_KEY = {"base_lr": "--lr"}


def _shown(value):
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_changes(trained, cfg):
    """['--flag old -> new', ...] for every key that decides what is trained or evaluated and differs between
    the checkpoint's config and cfg; keys an older checkpoint lacks are not compared."""
    changes = []
    # A --batch-size auto run resumes with the batch its search found, whatever the default is now.
    adopted = {"batch_size"} if cfg.get("batch_auto") else set()
    for key in sorted(cfg):
        if key in adopted or key in RESUME_MAY_CHANGE or key in RESUME_DERIVED or key not in trained or trained[key] == cfg[key]:
            continue
        flag = FLAG_OF_KEY.get(key, "--" + key.replace("_", "-"))
        changes.append(f"{flag} {_shown(trained[key])} -> {_shown(cfg[key])}")
    return changes


def load_resumable(path, cfg):
    """The checkpoint at path, refused with one line naming every flag that differs from cfg's."""
    checkpoint = load_checkpoint(path)
    changes = resume_changes(checkpoint["config"], cfg)
    if changes:
        raise UserError(f"--resume: {path} was trained with other settings ({'; '.join(changes)}); resume with the "
                        "flags it was trained with, or start a fresh --run-dir")
    return checkpoint


def restore_training(parts, checkpoint):
    """Loads model, optimizer, scheduler and scaler states; returns (epoch, step, best, epoch loss sum)."""
    parts.raw_model.load_state_dict(checkpoint["model"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    parts.scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["epoch"], checkpoint["step"], checkpoint["best_miou"], checkpoint.get("epoch_loss_sum", 0.0)
