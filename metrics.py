"""Metrics from confusion matrices: IoU per class, mIoU, damage-vs-clean IoU, and the CV summary table.

One implementation for training, evaluation and predict.py. A confusion matrix counts (truth, prediction)
pairs over a whole set (never averaged per batch); the label scheme's ignore id is left out. Class names, the
clean id and the coarse groups come from the scheme.
"""
import json
from pathlib import Path

import numpy as np
import torch

from files import read_jsonl
from labels import GROUP_COLUMNS, UserError, config_scheme, same_scheme


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


# Config keys that may differ between the runs one summary table averages: the fold and how a run was launched.
OPERATIONAL_KEYS = {"fold", "run_dir", "checkpoint", "resume", "dry_run", "summary", "log_every", "dist_timeout",
                    "world_size", "per_rank_batch", "micro_batch", "accum_steps", "preload", "eval_only",
                    "full_res", "data_flag", "splits", "threads", "classes_file", "classes_source", "given_flags",
                    "data_fingerprint", "tensorboard"}


def _test_record(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"--summary: {path} not found; is {run_dir} a finished run directory?")
    tests = [r for r in read_jsonl(path) if isinstance(r, dict) and "test" in r]
    if not tests:
        raise UserError(f"--summary: {path} has no test record; the fold has not finished (rerun it with --resume)")
    return tests[-1]


def _same_protocol(run_dirs):
    """(the common config of the runs, their label scheme); refuses runs that differ in anything but the fold."""
    configs, seen = [], {}
    for run_dir in run_dirs:
        path = Path(run_dir) / "config.json"
        if Path(run_dir).resolve() in seen:
            raise UserError(f"--summary: {run_dir} is given twice (also as {seen[Path(run_dir).resolve()]}); a fold "
                            "counts once")
        seen[Path(run_dir).resolve()] = run_dir
        if not path.is_file():
            raise UserError(f"--summary: {path} not found; is {run_dir} a run directory of train.py?")
        try:
            configs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise UserError(f"--summary: {path}: unreadable ({getattr(exc, 'strerror', None) or exc}); restore the "
                            "run's config.json") from None
        if not isinstance(configs[-1], dict):
            raise UserError(f"--summary: {path}: not a train.py config (a JSON object of flags)")
    wheres = [str(Path(d) / "config.json") for d in run_dirs]
    scheme = same_scheme([config_scheme(c, w) for c, w in zip(configs, wheres)], wheres,
                         "a table averages folds of one protocol only")
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        for key in sorted(set(config) | set(configs[0])):
            if key not in OPERATIONAL_KEYS | {"classes"} and config.get(key) != configs[0].get(key):
                raise UserError(f"--summary: {run_dir} was run with {key}={config.get(key)!r} but {run_dirs[0]} with "
                                f"{configs[0].get(key)!r}; a table averages folds of one protocol only")
    return configs[0], scheme


def _row(name, values):
    defined = [v for v in values if v is not None]
    if defined:
        std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
        cell = f"{100 * np.mean(defined):.2f} ± {100 * std:.2f}" + (f" ({len(defined)})" if len(defined) < len(values)
                                                                      else "")
    else:
        cell = "absent"
    return f"| {name} | {cell} | " + " | ".join("—" if v is None else f"{100 * v:.2f}" for v in values) + " |"


def summary(run_dirs):
    """Markdown table of the test metrics of each fold (scored once, with the selected checkpoint): mean ± std
    over folds (n-1); a group's cell averages the folds it appears in, their count in brackets."""
    config, scheme = _same_protocol(run_dirs)
    tests = [_test_record(d) for d in run_dirs]
    rule = {"inner": "best inner-validation mIoU epoch", "last": "final epoch"}.get(config.get("select"), "?")
    out = [f"Test metrics over {len(tests)} folds, each fold scored once; checkpoint selected by --select "
           f"{config.get('select')} ({rule}).", "",
           "| metric | mean ± std | " + " | ".join(Path(d).name for d in run_dirs) + " |",
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
