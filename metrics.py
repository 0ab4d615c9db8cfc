"""Metrics from confusion matrices: IoU per class, mIoU, damage-vs-clean IoU, a run's configuration (what folds of
one protocol share), and the CV summary table.

One implementation for training, evaluation, predict.py, report.py and compare.py. A confusion matrix counts
(truth, prediction) pairs over a whole set (never averaged per batch); the label scheme's ignore id is left out.
Class names, the clean id and the coarse groups come from the scheme.
"""
import json
import re
from pathlib import Path

import numpy as np
import torch

from labels import GROUP_COLUMNS, UserError, config_scheme, same_scheme
from writes import read_jsonl


def confusion(pred, target, num_classes, ignore, groups=None, num_groups=1):
    """Confusion matrix (rows: truth, cols: prediction) of one batch, target pixels equal to ignore left out,
    without a host sync.

    With groups (a group id per sample, shape (B,)) one matrix per group: (num_groups, C, C).
    """
    valid = target != ignore
    index = target * num_classes + pred
    size = num_classes * num_classes
    if groups is not None:
        index = index + groups.view(-1, *[1] * (target.dim() - 1)) * size
        size *= num_groups
    counts = torch.bincount(torch.where(valid, index, size).flatten(), minlength=size + 1)[:-1]
    return counts.view(num_classes, num_classes) if groups is None else counts.view(num_groups, num_classes, num_classes)


def iou_report(cm, names, clean=None):
    """Per-class IoU (None where a class is neither present nor predicted), mIoU over the rest, absent classes;
    with a clean id, binary_iou: every other class pooled as damage against it (for two classes, the damage
    class's IoU)."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = [None if u == 0 else float(i / u) for i, u in zip(inter, union)]
    defined = [v for v in iou if v is not None]
    report = {"miou": sum(defined) / len(defined) if defined else 0.0,
              "iou": dict(zip(names, iou)),
              "absent": [n for n, rows in zip(names, cm.sum(1)) if rows == 0],
              "pixel_acc": float(inter.sum() / cm.sum().clamp(min=1))}
    if clean is not None:
        damage = torch.tensor([c for c in range(len(names)) if c != clean])
        damage_inter = cm[damage][:, damage].sum()
        damage_union = cm[damage, :].sum() + cm[:, damage].sum() - damage_inter
        report["binary_iou"] = float(damage_inter / damage_union) if damage_union else None
    return report


def mean_iou(cms):
    """mIoU of every matrix in a stack (..., C, C) by iou_report's rule (the mean IoU over the classes that occur
    in the truth or the prediction; 0 when none does), vectorised for the bootstrap's resampled matrices."""
    cms = np.asarray(cms, dtype=np.float64)
    inter = np.diagonal(cms, axis1=-2, axis2=-1)
    union = cms.sum(-1) + cms.sum(-2) - inter
    defined = union > 0
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=defined)
    count = defined.sum(-1)
    return np.divide(iou.sum(-1), count, out=np.zeros(count.shape), where=count > 0)


def eval_metrics(cms, scheme):
    """Metrics record from evaluate's confusion matrices: the fine head's report at the top level (miou, iou,
    binary_iou, absent, pixel_acc); each other head's report nested under its name ("coarse", "binary"); and
    per group, e.g. {"by_material": {"Paper": report, ...}}, so no name collides with another."""
    names = scheme.head_names
    metrics = iou_report(cms["fine"].cpu(), names["fine"], scheme.clean)
    if "coarse" in cms:
        metrics["coarse"] = iou_report(cms["coarse"].cpu(), names["coarse"], scheme.coarse_of_fine[scheme.clean])
    if "binary" in cms:
        metrics["binary"] = iou_report(cms["binary"].cpu(), names["binary"])
    for column in GROUP_COLUMNS:
        if f"by_{column}" in cms:
            metrics[f"by_{column}"] = {name: iou_report(cm.cpu(), names["fine"], scheme.clean)
                                       for name, cm in cms[f"by_{column}"].items()}
    return metrics


def confusion_record(cms):
    """evaluate's confusion matrices as plain lists, for confusion.json."""
    return {key: ({name: m.tolist() for name, m in value.items()} if isinstance(value, dict) else value.tolist())
            for key, value in cms.items()}


# Config keys that may differ between the runs one summary table averages: the fold (and its held-out group) and
# how a run was launched. Everything else is the run's configuration.
OPERATIONAL_KEYS = {"fold", "held_out", "run_dir", "checkpoint", "resume", "dry_run", "summary", "log_every",
                    "dist_timeout", "dist_backend", "world_size", "per_rank_batch", "micro_batch", "accum_steps",
                    "preload", "eval_only", "full_res", "data_flag", "splits", "threads", "classes_file",
                    "classes_source", "no_report", "given_flags", "data_fingerprint",
                    "tensorboard"}


def protocol(config):
    """The configuration a run's config stands for: every key but the operational ones and the label scheme (which
    is compared as a scheme, labels.same_scheme, whichever file it came from)."""
    return {key: value for key, value in config.items() if key not in OPERATIONAL_KEYS | {"classes"}}


def read_config(run_dir, tool):
    """RUN_DIR/config.json as a dict; a missing or unreadable one is one line naming it (tool: who asks)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{tool}: {path} not found; is {run_dir} a run directory of train.py?")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{tool}: {path}: unreadable ({getattr(exc, 'strerror', None) or exc}); restore the run's "
                        "config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{tool}: {path}: not a train.py config (a JSON object of flags)")
    return config


def run_names(run_dirs):
    """A short, unique, file-name-safe name per run folder: its own name, or as many parent folders joined with
    '-' as it takes to tell runs apart (runs/bench/mit_b0/fold0 and runs/bench/resnet10t/fold0 ->
    mit_b0-fold0, resnet10t-fold0)."""
    parts = [Path(d).resolve().parts[1:] for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = [re.sub(r"[^\w.=+-]", "_", "-".join(p[-depth:])) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise UserError(f"the same run folder was given twice ({', '.join(map(str, run_dirs))}); pass each once")


def _test_record(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"--summary: {path} not found; is {run_dir} a finished run directory?")
    tests = [r for r in read_jsonl(path) if isinstance(r, dict) and "test" in r]
    if not tests:
        raise UserError(f"--summary: {path} has no test record; the fold has not finished (rerun it with --resume)")
    return tests[-1]


def same_protocol(run_dirs, tool, fix="a table averages folds of one protocol only"):
    """(the configs of the runs, their label scheme); refuses a folder given twice and runs that differ in anything
    but the fold and how they were launched, naming the first key that differs."""
    seen = {}
    for run_dir in run_dirs:
        other = seen.setdefault(Path(run_dir).resolve(), run_dir)
        if other is not run_dir:
            raise UserError(f"{tool}: {run_dir} is given twice (also as {other}); a fold counts once")
    configs = [read_config(d, tool) for d in run_dirs]
    wheres = [str(Path(d) / "config.json") for d in run_dirs]
    scheme = same_scheme([config_scheme(c, w) for c, w in zip(configs, wheres)], wheres, fix)
    first = protocol(configs[0])
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        other = protocol(config)
        for key in sorted(set(other) | set(first)):
            if other.get(key) != first.get(key):
                raise UserError(f"{tool}: {run_dir} was run with {key}={other.get(key)!r} but {run_dirs[0]} with "
                                f"{first.get(key)!r}; {fix}")
    return configs, scheme


def _row(name, values):
    defined = [v for v in values if v is not None]
    if len(defined) > 1:
        cell = f"{100 * np.mean(defined):.2f} ± {100 * np.std(defined, ddof=1):.2f}" + (
            f" ({len(defined)})" if len(defined) < len(values) else "")
    elif defined:
        # One fold has no spread: its value alone, not "± 0.00".
        cell = f"{100 * defined[0]:.2f} (1 fold)"
    else:
        cell = "absent"
    return f"| {name} | {cell} | " + " | ".join("—" if v is None else f"{100 * v:.2f}" for v in values) + " |"


SELECTION = {"inner": "best inner-validation mIoU epoch", "last": "final epoch"}


def summary(run_dirs):
    """Markdown table of the test metrics of each fold (scored once, with the selected checkpoint): mean ± std
    over folds (n-1); a group's cell averages the folds it appears in, their count in brackets."""
    configs, scheme = same_protocol(run_dirs, "--summary")
    tests = [_test_record(d) for d in run_dirs]
    select = configs[0].get("select")
    folds = [Path(d).name + (f" ({c['held_out']})" if c.get("held_out") else "") for d, c in zip(run_dirs, configs)]
    out = [f"Test metrics over {len(tests)} folds, each fold scored once; checkpoint selected by --select "
           f"{select} ({SELECTION.get(select, '?')}); mean ± std over folds (n-1).", "",
           "| metric | mean ± std | " + " | ".join(folds) + " |",
           "|---|---|" + "---|" * len(tests)]
    out.append(_row("miou", [t["test"]["miou"] for t in tests]))
    out.append(_row("binary_iou", [t["test"].get("binary_iou") for t in tests]))
    out += [_row(f"iou/{c}", [t["test"]["iou"].get(c) for t in tests]) for c in scheme.names]
    for column in GROUP_COLUMNS:
        names = sorted({name for t in tests for name in t["test"].get(f"by_{column}", {})})
        for name in names:
            groups = [t["test"].get(f"by_{column}", {}).get(name) for t in tests]
            out.append(_row(f"{column}/{name} miou", [g and g["miou"] for g in groups]))
            out.append(_row(f"{column}/{name} binary_iou", [g and g.get("binary_iou") for g in groups]))
    table = "\n".join(out)
    print(table)
    return table
