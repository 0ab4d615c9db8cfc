"""Checkpoint <-> model, one home for training, evaluation and predict.py.

A checkpoint is a dict of plain values (tensors, dicts, lists, numbers, strings): model, optimizer,
scheduler and scaler states, the weight EMA ("ema", with --ema), the random state, epoch, step, best metric and
the full run config, the label scheme included (config["classes"]). It is read with
``torch.load(weights_only=True)``, so a file from elsewhere cannot run code.
"""
import errno
import zipfile
from pathlib import Path

import torch

from files import atomic_write, free_bytes, write_error
from labels import UserError, config_scheme, scheme_difference, scheme_from_dict, scheme_to_dict
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
    needed = _tensor_bytes(state)
    fix = f"free space and rerun with --resume (the previous {path.name}, if any, is intact)"

    def write(tmp):
        # Through a file of our own: it is closed (its space freed) whatever torch.save raises, and the OS error
        # of a failed write reaches us as the cause of torch's RuntimeError ("unexpected pos", no errno).
        with open(tmp, "wb") as f:
            torch.save(state, f)
    try:
        atomic_write(path, write, needed, fix)
    except RuntimeError as exc:
        cause = _os_error(exc)
        error = write_error(path, cause, needed, fix) if cause else None
        if error is None and free_bytes(path.parent) < needed * 1.05 + 2**20:
            # No OS error to read (a torch build that writes on its own): too little room for the file means full.
            error = write_error(path, OSError(errno.ENOSPC, "No space left on device"), needed, fix)
        if error is None:
            raise
        raise error from None


def _os_error(exc):
    """The first OSError with an errno among exc's causes and contexts, or None."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _whole(minimum):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _fraction(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1


# What each config key that builds the model or drives evaluation must hold. A checkpoint edited by hand (or
# written by something else) is refused naming the key, rather than failing deep inside with a TypeError or
# evaluating at a nonsensical size; keys an older checkpoint lacks are left to their defaults.
CONFIG_RULES = {
    "encoder": (lambda v: isinstance(v, str) and v != "", "an encoder name"),
    "decoder": (lambda v: v in ("unet", "upernet"), "unet or upernet"),
    "heads": (lambda v: v in ("fine", "hierarchical"), "fine or hierarchical"),
    "norm": (lambda v: v in ("bn", "gn"), "bn or gn"),
    "img_size": (_whole(1), "a positive whole number of pixels"),
    "work_size": (_whole(0), "0 or a whole number of pixels"),
    "num_classes": (_whole(2), "a whole number of at least 2"),
    "micro_batch": (lambda v: v is None or _whole(1)(v), "a positive whole number"),
    "precision": (lambda v: v in ("auto", "bf16", "fp16", "fp32"), "bf16, fp16 or fp32"),
    "channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "split": (lambda v: v in ("single", "kfold", "material", "content"), "single, kfold, material or content"),
    "fold": (_whole(0), "0 or more"),
    "folds": (_whole(2), "at least 2"),
    "seed": (_whole(0), "0 or more"),
    "inner_frac": (_fraction, "between 0 and 1"),
    "select": (lambda v: v in ("inner", "last"), "inner or last"),
    "synthetic_count": (_whole(2), "at least 2"),
    "synthetic_size": (_whole(32), "at least 32"),
    "data": (lambda v: isinstance(v, str) and v != "", "a dataset folder or 'synthetic'"),
}


def check_config(config, path, flag="--checkpoint"):
    """Refuses config values of the wrong type or range, naming the key."""
    for key, (ok, need) in CONFIG_RULES.items():
        if key in config and not ok(config[key]):
            raise UserError(f"{flag} {path}: its config has {key} = {config[key]!r}, which must be {need}; the file "
                            "was edited or not written by train.py: pass an unmodified best.pt or last.pt")


def check_finite(model_state, path, flag="--checkpoint"):
    """Refuses weights holding NaN or inf: a model that diverged predicts nothing meaningful."""
    for name, tensor in model_state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{flag} {path}: its weights are not finite (NaN or inf in {name}); the run had diverged "
                            "when it was written: pass an earlier checkpoint, or retrain with a lower --lr")


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
    check_config(config, path, flag)
    check_finite(checkpoint["model"], path, flag)
    return checkpoint


def checkpoint_scheme(checkpoint, path):
    """The label scheme the checkpoint was trained with (ARTeFACT's, with a note, for checkpoints from before
    schemes travelled with them)."""
    scheme = config_scheme(checkpoint["config"], f"--checkpoint {path}")
    num_classes = checkpoint["config"].get("num_classes", scheme.num_classes)
    if num_classes != scheme.num_classes:
        raise UserError(f"--checkpoint {path}: model has {num_classes} classes but its label scheme "
                        f"{scheme.num_classes}; pass an unmodified checkpoint written by train.py")
    return scheme


def model_from_checkpoint(checkpoint, path, img_size=None):
    """The network its config describes, with the checkpoint's weights (on the CPU, train mode): the EMA
    weights when the run kept an average (--ema, "ema"; the ones it selected and tested), else the trained ones."""
    config = checkpoint["config"]
    scheme = checkpoint_scheme(checkpoint, path)
    model = build_model(config["encoder"], scheme.num_classes, decoder=config.get("decoder", "unet"),
                        heads=config.get("heads", "fine"), pretrained=False,
                        img_size=img_size or config.get("img_size", 384), norm=config.get("norm", "bn"),
                        num_groups=len(scheme.groups) if scheme.groups else None)
    try:
        model.load_state_dict(strip_wrapper_prefixes(checkpoint.get("ema") or checkpoint["model"]))
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"--checkpoint {path}: weights do not fit the model its config describes ({reason}); "
                        "pass the matching --img-size or an unmodified checkpoint") from None
    return model


MODEL_FORMAT = "artdamage-model"
# What prediction reads from a config: the network's shape, the scale it was trained at, its label scheme.
PORTABLE_KEYS = MODEL_KEYS + ("work_size",)


def portable_model(checkpoint, path, normalisation):
    """The small file prediction needs: the weights model_from_checkpoint takes (the EMA weights where a run
    kept them), the config keys that rebuild the network at its scale, the label scheme and the input
    normalisation ((mean, std) per channel); no optimizer state. load_checkpoint and model_from_checkpoint read it as
    they read a checkpoint."""
    config = {key: checkpoint["config"][key] for key in PORTABLE_KEYS if key in checkpoint["config"]}
    scheme = checkpoint_scheme(checkpoint, path)
    mean, std = normalisation
    config.update(classes=scheme_to_dict(scheme), num_classes=scheme.num_classes,
                  normalisation={"mean": list(mean), "std": list(std)})
    return {"format": MODEL_FORMAT, "model": model_from_checkpoint(checkpoint, path).state_dict(), "config": config,
            "trained": {"checkpoint": str(path), "epoch": checkpoint.get("epoch"),
                        "best_miou": checkpoint.get("best_miou")}}


def save_model(checkpoint, path, out, normalisation):
    """Writes the portable model of the checkpoint read from path to out (atomically); returns its bytes."""
    state = portable_model(checkpoint, path, normalisation)
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    return Path(out).stat().st_size


def training_state(parts, cfg, epoch, step, best, loss_sum=0.0):
    """Everything --resume needs: states of model, EMA, optimizer, scheduler and scaler, the random state
    (--drop-path draws from it), progress, config, and the selection so far, best = (inner mIoU, epoch) of
    best.pt (-1.0, None before any)."""
    state = {"model": parts.raw_model.state_dict(), "optimizer": parts.optimizer.state_dict(),
             "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(), "epoch": epoch,
             "step": step, "epoch_loss_sum": loss_sum, "best_miou": best[0], "best_epoch": best[1], "config": cfg,
             "rng": random_state()}
    if parts.ema is not None:
        state["ema"] = parts.ema.model.state_dict()
    return state


def random_state():
    """torch's CPU generator and, on a GPU, the current device's: every rank draws the same, so rank 0's
    state is every rank's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


# Config keys a resumed run may change: how it is launched, logged and checked, not what it trains or evaluates
# (the global batch's objective does not depend on the number of ranks or micro-batches). Every other key of
# the config must match, so a flag added later is covered without being listed here.
RESUME_MAY_CHANGE = {"run_dir", "checkpoint", "resume", "dry_run", "summary", "log_every", "dist_timeout",
                     "dist_backend", "threads", "no_report", "preload", "world_size", "per_rank_batch", "micro_batch",
                     "accum_steps", "device", "eval_only", "eval_split", "full_res", "data_flag", "batch_auto",
                     "skip_nonfinite", "max_skipped", "given_flags", "tensorboard", "device_data"}
# Derived from other keys that are compared themselves (lr from --lr and the batch); the label scheme is
# compared as a scheme (labels.scheme_difference), whichever file it was read from.
RESUME_DERIVED = {"lr", "classes", "num_classes", "classes_file", "classes_source"}
FLAG_OF_KEY = {"base_lr": "--lr", "data_fingerprint": "the files of --data"}


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
    difference = scheme_difference(checkpoint_scheme(checkpoint, path), scheme_from_dict(cfg["classes"], "the run"))
    if difference:
        changes.insert(0, f"label scheme: {difference}, checkpoint vs {cfg['classes_source']}")
    if changes:
        raise UserError(f"--resume: {path} was trained with other settings ({'; '.join(changes)}); resume with the "
                        "flags it was trained with, or start a fresh --run-dir")
    return checkpoint


def check_scheme(trained, scheme, source, lead):
    """Refuses, in one line naming the difference, a checkpoint whose label scheme (trained) is not the dataset's
    (scheme, read from source); lead names the checkpoint, e.g. "--checkpoint PATH: trained"."""
    difference = scheme_difference(trained, scheme)
    if difference:
        raise UserError(f"{lead} with another label scheme than {source} ({difference}; checkpoint vs dataset); "
                        "pass the dataset and --classes it was trained with")


def restore_training(parts, checkpoint):
    """Loads model, EMA, optimizer, scheduler, scaler and random states; returns (epoch, step, (best mIoU, its
    epoch), epoch loss sum)."""
    parts.raw_model.load_state_dict(checkpoint["model"])
    if parts.ema is not None:
        parts.ema.model.load_state_dict(checkpoint["ema"])
    rng = checkpoint.get("rng", {})
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    parts.scaler.load_state_dict(checkpoint["scaler"])
    return (checkpoint["epoch"], checkpoint["step"], (checkpoint["best_miou"], checkpoint.get("best_epoch")),
            checkpoint.get("epoch_loss_sum", 0.0))
