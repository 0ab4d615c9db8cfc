"""Results a person can look at: PNG pictures of training runs of one configuration (one run, or the folds of a
cross-validation) and one report.md that shows them with the numbers.

    python report.py RUN_DIR [RUN_DIR ...] [--out DIR] [--images N] [--seed S]

Writes into the first run folder (or --out): curves.png (train loss, inner-validation mIoU and damage-vs-clean
IoU per epoch; several folds as their mean ± std band), class_iou.png (per-class IoU of each run's test record,
classes absent from the ground truth marked, not drawn as zero), confusion.png and groups.png (from
RUN_DIR/confusion.json, the test evaluation's matrices, pooled over the folds), panels.png (image | truth |
prediction | errors for a seeded set of test images, predicted by best.pt or last.pt; panels-RUN.png for several
runs) with the masks as palette PNGs under samples/RUN/, and report.md, whose headline is the mean over folds as
in train.py --summary. Runs of different configurations are refused (compare.py compares them). Class names and
colours are the runs' label scheme (their config.json; one scheme for all runs).
"""
import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders of train.py (several: e.g. the folds of a CV run)")
    parser.add_argument("--out", help="folder for the PNGs and report.md (default: the first run folder)")
    parser.add_argument("--images", type=int, default=4, help="test images in the truth/prediction panels")
    parser.add_argument("--seed", type=int, default=42, help="seed that picks the panel images")
    return parser


if __name__ == "__main__":
    # --help and flag mistakes answer before torch and matplotlib load (seconds on a cold node).
    build_parser().parse_args()

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
from checkpoint import check_scheme, checkpoint_scheme, load_checkpoint, model_from_checkpoint
from files import read_image, read_mask
from labels import UserError, colour_table, run_cli
from metrics import iou_report, run_names, same_protocol
from predict import write_mask
from tiles import Tiling, predict_at_scale
from writes import read_jsonl, write_error

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator
except ImportError:  # train.py imports this file; without matplotlib, build_report says what to install
    plt = None

DPI = 100
# Figure sizes in inches; the PNGs are DPI times these in pixels (panels grow by PANEL_ROW per image).
FIGSIZE = {"curves": (15, 4), "class_iou": (14, 5), "confusion": (10, 9), "groups": (12, 4), "panels": (14, 1)}
PANEL_ROW = 3.5
# Panels are predicted at most this many pixels across: ARTeFACT images reach 12,000 px, which would take
# minutes per image on a CPU and could not be seen at panel size anyway.
PANEL_MAX_SIDE = 1024
WRONG = (255, 0, 0)


def read_records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; pass run folders written by train.py")
    records = read_jsonl(path)
    if not records:
        raise UserError(f"{path}: empty; the run has not finished an epoch")
    return records


def one_configuration(run_dirs):
    """The label scheme of runs of one configuration (their config.json; ARTeFACT's, with a note, for runs written
    before runs carried one); runs of another configuration or scheme are refused in one line."""
    return same_protocol(run_dirs, "report.py", "report one configuration at a time (one run or its folds); "
                         "compare configurations with python compare.py")[1]


def epochs_of(records):
    return [r for r in records if "epoch" in r]


def reported(records):
    """(label, metrics) a run reports: its test record (the selected checkpoint on the untouched test fold),
    or, for a run that has not reached it, its best inner-validation epoch (labelled so)."""
    tests = [r for r in records if "test" in r]
    if tests:
        return f"test, epoch {tests[-1]['selected_epoch']}", tests[-1]["test"]
    scored = [r for r in epochs_of(records) if "val" in r]
    if not scored:
        raise UserError("the run has neither a test record nor validation scores yet")
    best = max(scored, key=lambda r: r["val"]["miou"])
    return f"inner val, epoch {best['epoch']} (no test record yet)", best["val"]


def class_iou_bars(metrics, names):
    """Per-class IoU of one metrics dict, in the order of names; None for classes absent from the ground truth
    (or never scored), so that they can be marked rather than drawn as a zero."""
    absent = set(metrics.get("absent", []))
    return [None if name in absent else metrics["iou"].get(name) for name in names]


def has_validation(runs):
    """False when no run scored an inner split (`--select last` trains on it)."""
    return any("val" in r for _, records in runs for r in records)


def _save(fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _by_epoch(runs, value):
    """(epochs, per-run values) with NaN where a run has no value at that epoch."""
    epochs = sorted({r["epoch"] for _, records in runs for r in epochs_of(records)})
    table = np.full((len(runs), len(epochs)), np.nan)
    for k, (_, records) in enumerate(runs):
        for r in epochs_of(records):
            v = value(r)
            table[k, epochs.index(r["epoch"])] = np.nan if v is None else v
    return epochs, table


def plot_curves(runs, path):
    """One run's curves; several runs (folds) as their mean per epoch with a ± std (n-1) band and each fold
    faint behind it. The legend sits below the panels, off the curves."""
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE["curves"], layout="constrained")
    values = (lambda r: r["train_loss"], lambda r: r.get("val", {}).get("miou"),
              lambda r: r.get("val", {}).get("binary_iou"))
    for ax, value in zip(axes, values):
        epochs, table = _by_epoch(runs, value)
        if len(runs) == 1:
            ax.plot(epochs, table[0], marker="o", label=runs[0][0])
            continue
        for row in table:
            ax.plot(epochs, row, color="tab:blue", alpha=0.25, linewidth=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an epoch no fold has scored is NaN, drawn as a gap
            mean, std = np.nanmean(table, 0), np.nanstd(table, 0, ddof=1)
        ax.plot(epochs, mean, marker="o", color="tab:blue", label=f"mean of {len(runs)} folds")
        ax.fill_between(epochs, mean - std, mean + std, color="tab:blue", alpha=0.2, label="± std over folds (n-1)")
        ax.plot([], [], color="tab:blue", alpha=0.25, label="each fold")
    for ax, title in zip(axes, ("train loss", "inner-validation mIoU", "inner-validation damage-vs-clean IoU")):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if not has_validation(runs):
        for ax in axes[1:]:
            ax.set(xticks=[], yticks=[])
            ax.text(0.5, 0.5, "no inner validation:\n--select last trains on those images", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    _save(fig, path)


def plot_class_iou(runs, path, names):
    fig, ax = plt.subplots(figsize=FIGSIZE["class_iou"], layout="constrained")
    width = 0.8 / len(runs)
    for k, (name, records) in enumerate(runs):
        xs = np.arange(len(names)) + (k - (len(runs) - 1) / 2) * width
        values = class_iou_bars(reported(records)[1], names)
        ax.bar(xs, [np.nan if v is None else v for v in values], width, label=name)
        for x, v in zip(xs, values):
            if v is None:
                ax.bar(x, 1, width, color="none", edgecolor="0.7", hatch="//")
                ax.text(x, 0.5, "absent", rotation=90, ha="center", va="center", color="0.4", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set(ylim=(0, 1), ylabel="IoU", title="per-class IoU on the test fold (hatched: absent from the ground truth)")
    if len(runs) > 1:
        fig.legend(loc="outside right upper")
    _save(fig, path)


def plot_confusion(matrix, path, names):
    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    # Rows of classes absent from the ground truth are NaN, drawn grey so they do not read as "never predicted".
    norm = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    fig, ax = plt.subplots(figsize=FIGSIZE["confusion"], layout="constrained")
    shown = ax.imshow(norm, cmap=plt.get_cmap("Blues").with_extremes(bad="0.85"), vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(norm):
        if v >= 0.005:
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="prediction", ylabel="ground truth", title="confusion matrix, % of each true class")
    fig.colorbar(shown, ax=ax, shrink=0.8)
    _save(fig, path)


def plot_groups(by_kind, path, pooled):
    fig, axes = plt.subplots(1, len(by_kind), figsize=FIGSIZE["groups"], layout="constrained", squeeze=False)
    for ax, (kind, mious) in zip(axes[0], by_kind.items()):
        bars = ax.bar(list(mious), list(mious.values()), color="tab:blue")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set(ylim=(0, 1), ylabel="mIoU", title=f"mIoU by {kind}" + (" (pooled over the folds)" if pooled else ""))
        ax.tick_params(axis="x", rotation=30)
    _save(fig, path)


def read_confusion(run_dirs, num_classes):
    """{key: summed matrix or {group: summed matrix}} over the runs that have confusion.json (a C x C fine matrix
    for the C classes of their label scheme), and those runs."""
    shape = f"{num_classes}x{num_classes}"
    total, found = {}, []
    for run_dir in run_dirs:
        path = Path(run_dir) / "confusion.json"
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text())
            fine = np.asarray(content["fine"], dtype=np.int64)
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path}: unreadable; expected JSON with a {shape} 'fine' matrix") from None
        if fine.shape != (num_classes, num_classes):
            raise UserError(f"{path}: 'fine' is {fine.shape}, expected {shape} for the run's {num_classes} classes "
                            "(rows truth, columns prediction)")
        found.append(path)
        # Folds test on disjoint images, so summing their matrices scores the whole cross-validation at once.
        # The damage-vs-clean IoU comes from the fine matrix, so "binary" is not needed.
        for key in ("fine", "coarse"):
            if key in content:
                total[key] = total.get(key, 0) + np.asarray(content[key], dtype=np.int64)
        for key in ("by_material", "by_content"):
            groups = total.setdefault(key, {}) if key in content else {}
            for group, cm in content.get(key, {}).items():
                groups[group] = groups.get(group, 0) + np.asarray(cm, dtype=np.int64)
    return total, found


def panel_samples(config, count, seed):
    """A fixed, seeded choice of the test images of the run's fold (in split order)."""
    samples = data.part_samples(config, "test")
    rng = np.random.default_rng(seed)
    return [samples[i] for i in sorted(rng.choice(len(samples), min(count, len(samples)), replace=False))]


def _shrink(image, mask):
    height, width = mask.shape
    scale = PANEL_MAX_SIDE / max(height, width)
    if scale >= 1:
        return image, mask
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return (np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)),
            np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)))


def error_map(image, truth, pred, scheme):
    """The image dimmed to grey, wrong pixels in red, outside-object pixels in the scheme's ignore colour."""
    grey = (image.mean(2, keepdims=True) * 0.5 + 64).astype(np.uint8).repeat(3, axis=2)
    grey[(pred != truth) & (truth != scheme.ignore)] = WRONG
    grey[truth == scheme.ignore] = scheme.ignore_colour
    return grey


def predict_panels(checkpoint_path, samples_dir, count, seed, scheme):
    """[(sample id, image, truth, prediction)] for the seeded test images; masks written into samples_dir. The
    checkpoint and the dataset must hold the runs' label scheme."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    lead = f"{checkpoint_path}: trained"
    check_scheme(checkpoint_scheme(checkpoint, checkpoint_path), scheme, "its run folder", lead)
    dataset, source = data.data_scheme(config["data"], config.get("classes_file"), (scheme, "the run's scheme"))
    check_scheme(scheme, dataset, source, lead)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(checkpoint, checkpoint_path).to(device).eval()
    samples_dir.mkdir(parents=True, exist_ok=True)
    panels = []
    for sample in panel_samples(config, count, seed):
        image = read_image(sample.image)
        image, truth = _shrink(image, read_mask(sample.mask, scheme, image.shape[:2]))
        pred = predict_at_scale(model, image, Tiling(config.get("img_size", 384), device=device),
                                config.get("work_size", 0))
        pred[truth == scheme.ignore] = scheme.ignore
        write_mask(samples_dir / f"{sample.id}_truth.png", np.ascontiguousarray(truth), scheme)
        write_mask(samples_dir / f"{sample.id}_prediction.png", pred, scheme)
        panels.append((sample.id, image, truth, pred))
    return panels


def plot_panels(panels, path, scheme, run):
    width, height = FIGSIZE["panels"]
    fig, axes = plt.subplots(len(panels), 4, figsize=(width, height + PANEL_ROW * len(panels)), squeeze=False,
                             layout="constrained")
    fig.suptitle(f"{run}: test images, truth vs prediction")
    colours = colour_table(scheme)
    for row, (sample_id, image, truth, pred) in zip(axes, panels):
        pictures = (image, colours[truth], colours[pred], error_map(image, truth, pred, scheme))
        for ax, picture, title in zip(row, pictures, ("image", "ground truth", "prediction", "errors (red)")):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(f"{sample_id}: {title}", fontsize=9)
            ax.axis("off")
    present = sorted(set().union(*(np.unique(np.concatenate([t.ravel(), p.ravel()])).tolist()
                                   for _, _, t, p in panels)))
    handles = [Patch(color=colours[k] / 255, label=scheme.names[k]) for k in present if k < scheme.num_classes]
    if scheme.ignore in present:
        handles.append(Patch(color=colours[scheme.ignore] / 255, label="Outside object"))
    handles.append(Patch(color=np.array(WRONG) / 255, label="wrong (errors)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=9)
    _save(fig, path)


def _pct(value):
    return "absent" if value is None else f"{100 * value:.2f}"


def _mean_std(values):
    defined = [v for v in values if v is not None]
    if not defined:
        return "absent"
    if len(defined) == 1:
        return f"{_pct(defined[0])} %"
    return f"{100 * np.mean(defined):.2f} ± {100 * np.std(defined, ddof=1):.2f} %"


def headline(runs):
    """The report's first numbers: one run's test scores, or the mean ± std (n-1) over the folds' test scores, as
    train.py --summary gives them (never the pooled matrix's)."""
    reports = [reported(records) for _, records in runs]
    where = "test" if all(label.startswith("test") for label, _ in reports) else "reported (not all runs tested yet)"
    over = "" if len(runs) == 1 else f" (mean ± std over {len(runs)} folds, n-1, as train.py --summary)"
    return [f"**{where} mIoU {_mean_std([m['miou'] for _, m in reports])}, damage-vs-clean IoU "
            f"{_mean_std([m.get('binary_iou') for _, m in reports])}**{over}.", ""]


def curves_section(runs):
    how = ("Validation scores are on the inner split that selects the checkpoint" if has_validation(runs) else
           "No inner validation (`--select last`: the last epoch is the reported checkpoint)")
    bands = " Several folds are drawn as their mean per epoch with a ± std band." if len(runs) > 1 else ""
    lines = ["## Training curves", "", f"{how}; the reported scores are on the test fold, scored once.{bands}", "",
             "![training curves](curves.png)", "",
             "| run | epochs | reported | mIoU % | damage IoU % | last train loss |", "|---|---|---|---|---|---|"]
    for name, records in runs:
        label, metrics = reported(records)
        epochs = epochs_of(records)
        lines.append(f"| {name} | {len(epochs)} | {label} | {_pct(metrics['miou'])} | "
                     f"{_pct(metrics.get('binary_iou'))} | {epochs[-1]['train_loss']:.4f} |")
    return lines


def class_section(runs, names):
    columns = " | ".join(f"{name} ({reported(records)[0]})" for name, records in runs)
    lines = ["## Per-class IoU", "", "IoU of each class on each run's test fold (the selected checkpoint); classes "
             "absent from the ground truth are hatched and written `absent`, not counted as zero.", "",
             "![per-class IoU](class_iou.png)", "", f"| class | {columns} |", "|---|" + "---|" * len(runs)]
    bars = [class_iou_bars(reported(records)[1], names) for _, records in runs]
    for k, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(_pct(values[k]) for values in bars) + " |")
    return lines


def _scores(cm, names, clean):
    return iou_report(torch.tensor(cm), names, clean)


def confusion_section(run_dirs, out, scheme):
    total, found = read_confusion(run_dirs, scheme.num_classes)
    if not found:
        return ["## Confusion matrix", "", "No `confusion.json` in " + ", ".join(f"`{d}`" for d in run_dirs)
                + ": the confusion matrix and the per-material / per-content mIoU are not drawn."]
    plot_confusion(total["fine"], out / "confusion.png", scheme.names)
    fine = _scores(total["fine"], scheme.names, scheme.clean)
    pooled = len(found) > 1
    lines = ["## Confusion matrix", "", f"From {', '.join(f'`{p}`' for p in found)}"
             + (" (summed: pooled over the folds' test images)" if pooled else "") + ". Rows are the ground truth, "
             "normalised to 100 %; grey rows are classes absent from it.", "", "![confusion matrix](confusion.png)", "",
             ("Pooled (one matrix over every fold's test images; not the mean over folds of the headline): "
              if pooled else "") + f"mIoU {_pct(fine['miou'])} %, damage-vs-clean IoU {_pct(fine.get('binary_iou'))} "
             f"%, pixel accuracy {_pct(fine['pixel_acc'])} %."]
    if "coarse" in total and scheme.groups:
        coarse = _scores(total["coarse"], scheme.head_names["coarse"], scheme.coarse_of_fine[scheme.clean])
        lines[-1] += f" Coarse groups mIoU {_pct(coarse['miou'])} %."
    by_kind = {key[3:]: {name: _scores(cm, scheme.names, scheme.clean)["miou"]
                         for name, cm in sorted(total[key].items())}
               for key in ("by_material", "by_content") if key in total}
    if by_kind:
        plot_groups(by_kind, out / "groups.png", pooled)
        lines += ["", "## mIoU by material and content", "", "![mIoU by group](groups.png)", "",
                  "| group | mIoU %" + (" (pooled)" if pooled else "") + " |", "|---|---|"]
        lines += [f"| {kind}: {name} | {_pct(v)} |" for kind, mious in by_kind.items() for name, v in mious.items()]
    return lines


def panels_section(run_dirs, names, out, images, seed, scheme):
    """Truth vs prediction per run: panels.png for one run, panels-RUN.png for several, the masks under
    samples/RUN/, so no two runs' files share a name."""
    lines = ["## Truth vs prediction", ""]
    for run_dir, run in zip(run_dirs, names):
        checkpoint = next((run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None)
        if checkpoint is None:
            lines += [f"No best.pt or last.pt in `{run_dir}`: no prediction panels.", ""]
            continue
        try:
            panels = predict_panels(checkpoint, out / "samples" / run, images, seed, scheme)
        except UserError as exc:
            # A report at the end of a long training run must not fail over a dataset moved since.
            print(f"note: no prediction panels for {run_dir}: {exc}", file=sys.stderr)
            lines += [f"No prediction panels for `{run_dir}`: {exc}", ""]
            continue
        name = "panels.png" if len(run_dirs) == 1 else f"panels-{run}.png"
        plot_panels(panels, out / name, scheme, run)
        lines += [f"{len(panels)} test images of `{run_dir}` (chosen with seed {seed}), predicted by "
                  f"`{checkpoint.name}` at most {PANEL_MAX_SIDE} px across; errors: wrong pixels in red, "
                  "outside the object in the background colour.", "", f"![truth vs prediction, {run}]({name})", "",
                  "Masks (palette PNGs in the label scheme's colours): " + ", ".join(
                      f"[{i} truth](samples/{run}/{i}_truth.png) / [prediction](samples/{run}/{i}_prediction.png)"
                      for i, *_ in panels), ""]
    return lines


def build_report(run_dirs, out=None, images=4, seed=42):
    """Writes the PNGs and report.md of runs of one configuration into out (default: the first run folder);
    returns report.md's path."""
    if plt is None:
        raise UserError("report.py needs matplotlib for its pictures; pip install matplotlib")
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise UserError("report.py: give at least one run folder")
    names = run_names(run_dirs)
    runs = [(name, read_records(d)) for name, d in zip(names, run_dirs)]
    scheme = one_configuration(run_dirs)
    out = Path(out) if out else run_dirs[0]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror}); pass a writable folder") from None
    try:
        plot_curves(runs, out / "curves.png")
        plot_class_iou(runs, out / "class_iou.png", scheme.names)
        lines = [f"# Results of {', '.join(name for name, _ in runs)}", ""] + headline(runs)
        lines += curves_section(runs) + [""] + class_section(runs, scheme.names) + [""]
        lines += confusion_section(run_dirs, out, scheme) + [""]
        lines += panels_section(run_dirs, names, out, images, seed, scheme)
        path = out / "report.md"
        path.write_text("\n".join(lines).rstrip() + "\n")
    except OSError as exc:
        # A full or read-only --out costs nothing of the runs; the same command writes the report later.
        command = f"python report.py {' '.join(map(str, run_dirs))}"
        error = write_error(Path(exc.filename) if exc.filename else out / "report.md", exc,
                            fix=f"free space (or pass --out DIR) and rerun `{command}`")
        if error is None:
            raise
        raise error from None
    return path


def main(argv=None):
    args = build_parser().parse_args(argv)

    def job():
        if args.images < 1:
            raise UserError(f"--images {args.images}: must be at least 1")
        print(build_report(args.run_dirs, args.out, args.images, args.seed))
    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
