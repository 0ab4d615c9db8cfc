"""Metrics from confusion matrices: IoU per class, mIoU, damage-vs-clean IoU, and the CV summary table.

One implementation for training, evaluation and predict.py. A confusion matrix counts (truth, prediction)
pairs over a whole set (never averaged per batch); label 255 is left out.
"""
import json
from pathlib import Path

import numpy as np
import torch

from labels import CLASS_NAMES, HEAD_NAMES, IGNORE_INDEX, UserError


def confusion(pred, target, num_classes):
    """Confusion matrix (rows: truth, cols: prediction) of one batch, 255 ignored, without a host sync."""
    valid = target != IGNORE_INDEX
    index = torch.where(valid, target * num_classes + pred, num_classes * num_classes)
    counts = torch.bincount(index.flatten(), minlength=num_classes * num_classes + 1)
    return counts[:-1].view(num_classes, num_classes)


def iou_report(cm, names):
    """Per-class IoU (None where a class is neither present nor predicted), mIoU over the rest, absent classes."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = [None if u == 0 else float(i / u) for i, u in zip(inter, union)]
    defined = [v for v in iou if v is not None]
    report = {"miou": sum(defined) / len(defined) if defined else 0.0,
              "iou": dict(zip(names, iou)),
              "absent": [n for n, rows in zip(names, cm.sum(1)) if rows == 0],
              "pixel_acc": float(inter.sum() / cm.sum().clamp(min=1))}
    if len(names) > 2:
        damage_inter = cm[1:, 1:].sum()
        damage_union = cm[1:, :].sum() + cm[:, 1:].sum() - damage_inter
        report["binary_iou"] = float(damage_inter / damage_union) if damage_union else None
    return report


def eval_metrics(cms):
    """Metrics from {head: confusion matrix}: the fine head's report at the top level (miou, iou, binary_iou,
    ...), each other head's whole report nested under its name ("coarse", "binary"), so no key collides."""
    metrics = iou_report(cms["fine"].cpu(), HEAD_NAMES["fine"])
    for head, cm in cms.items():
        if head != "fine":
            metrics[head] = iou_report(cm.cpu(), HEAD_NAMES[head])
    return metrics


def summary(run_dirs):
    """Markdown table of mean ± std (over folds, n-1) of each fold's best epoch."""
    rows = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            raise UserError(f"--summary: {path} not found; is {run_dir} a finished run directory?")
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--summary: {path} is empty; the fold has not finished an epoch")
        rows.append(max(lines, key=lambda r: r["miou"]))
    names = ["miou", "binary_iou"] + [f"iou/{c}" for c in CLASS_NAMES]
    values = {n: [] for n in names}
    for r in rows:
        values["miou"].append(r["miou"])
        values["binary_iou"].append(r.get("binary_iou"))
        for c in CLASS_NAMES:
            values[f"iou/{c}"].append(r["iou"].get(c))
    out = [f"| metric | mean ± std ({len(rows)} folds) | " + " | ".join(Path(d).name for d in run_dirs) + " |",
           "|---|---|" + "---|" * len(rows)]
    for n in names:
        vals = [v for v in values[n] if v is not None]
        if vals:
            std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            cell = f"{100 * np.mean(vals):.2f} ± {100 * std:.2f}"
        else:
            cell = "absent"
        folds = " | ".join("—" if v is None else f"{100 * v:.2f}" for v in values[n])
        out.append(f"| {n} | {cell} | {folds} |")
    table = "\n".join(out)
    print(table)
    return table
