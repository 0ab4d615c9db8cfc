"""Run folders -> configurations -> the comparison table a researcher publishes: one row per configuration, its
differing settings first, then its folds' test metrics as mean ± std over folds (overall, per class, per
material and content, at the working scale and at full resolution) and what it cost; a paired image-level
bootstrap of the mIoU difference for every pair of rows; Markdown on stdout and comparison.md / .csv / .tex /
.json, comparison-classes.tex, comparison-pairs.csv and comparison.png in --out. Every IoU comes from metrics.py.

    python compare.py RUN_DIR_OR_PARENT [...] [--out DIR] [--resamples 1000] [--seed 42] [--level 0.95]
"""
import argparse
import collections
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from labels import GROUP_COLUMNS, HelpFormatter, UserError, config_scheme, note, run_cli, same_scheme
from metrics import SELECTION, mean_iou, protocol, read_config
from runs import per_image_path, read_per_image
from writes import read_jsonl

# One fold of one configuration: its run folder and config, the working-scale test metrics, the test images'
# ids and per-image fine matrices, where they came from, the full-resolution test metrics (or None), run.json
# (or None) and the median training img/s over its epochs.
Fold = collections.namedtuple("Fold", "run_dir config name test ids matrices source fullres cost img_s")
Row = collections.namedtuple("Row", "label settings folds")
SOURCES = {"metrics.jsonl": "metrics.jsonl with confusion_per_image.npz",
           "eval-test.json": "eval-test.json of --eval-only with eval-test_per_image.npz"}
# Settings shown first when they differ between rows; any other differing key follows, sorted.
KEY_ORDER = ("encoder", "decoder", "heads", "loss", "class_weights", "select")


def find_runs(paths):
    """Run folders (config.json beside metrics.jsonl) given directly or anywhere below a given folder."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"compare: {path}: not a folder; pass run folders of train.py or a folder above them")
        runs = [path] if (path / "config.json").is_file() else sorted(
            c.parent for c in path.rglob("config.json") if (c.parent / "metrics.jsonl").is_file())
        if not runs:
            raise UserError(f"compare: {path}: no run folders (config.json with metrics.jsonl) in it; pass run "
                            "folders of train.py or a folder above them")
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def _records(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"compare: {path} not found; is {run_dir} a run folder of train.py?")
    return read_jsonl(path)


def _eval_file(path, run_dir):
    """An --eval-only record beside the run's best.pt, or None (with a note) when it scored another checkpoint."""
    record = json.loads(path.read_text())
    if Path(record.get("checkpoint", "")).name != "best.pt":
        note(f"{path} scored {record.get('checkpoint')}, not the selected {run_dir / 'best.pt'}; left out")
        return None
    return record


def _checked(metrics, fine, per_image, run_dir, source):
    """(metrics, ids, per-image matrices, source) once the per-image matrices add up to the evaluation's."""
    ids, matrices = read_per_image(per_image)
    if not np.array_equal(matrices.sum(0), np.asarray(fine)):
        raise UserError(f"compare: {per_image} does not add up to the matrix of {source} (files of two "
                        f"evaluations?); score {run_dir / 'best.pt'} again with train.py --eval-only")
    return metrics, ids, matrices, source


def _working_scale(run_dir, records):
    """train.py's test record with confusion.json and confusion_per_image.npz or, for a run from before those
    per-image files, `train.py --eval-only`'s eval-test.json with eval-test_per_image.npz."""
    tests = [r for r in records if "test" in r]
    confusion = run_dir / "confusion.json"
    if tests and per_image_path(confusion).is_file():
        return _checked(tests[-1]["test"], json.loads(confusion.read_text())["fine"], per_image_path(confusion),
                        run_dir, "metrics.jsonl")
    evaluated = run_dir / "eval-test.json"
    record = _eval_file(evaluated, run_dir) if per_image_path(evaluated).is_file() else None
    if record is not None:
        return _checked(record["test"], record["confusion"]["fine"], per_image_path(evaluated), run_dir,
                        "eval-test.json")
    if not tests:
        raise UserError(f"compare: {run_dir / 'metrics.jsonl'} has no test record; the fold has not finished (rerun "
                        "it with --resume) or leave it out")
    raise UserError(f"compare: {run_dir} has no confusion_per_image.npz (each test image's confusion matrix, which "
                    f"train.py writes since the comparison exists); score it again with `python train.py --eval-only "
                    f"--checkpoint {run_dir / 'best.pt'}`, which writes eval-test_per_image.npz")


def read_fold(run_dir):
    config = read_config(run_dir, "compare")
    records = _records(run_dir)
    test, ids, matrices, source = _working_scale(run_dir, records)
    full_path = run_dir / "eval-test-fullres.json"
    fullres = _eval_file(full_path, run_dir) if full_path.is_file() else None
    cost = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else None
    rates = [r["img_s"] for r in records if "epoch" in r and r.get("img_s")]
    name = f"fold{config.get('fold', '?')}" + (f" ({config['held_out']})" if config.get("held_out") else "")
    return Fold(run_dir, config, name, test, ids, matrices, source, fullres and fullres["test"], cost,
                statistics.median(rates) if rates else None)


def _shown(value):
    text = Path(value).name if isinstance(value, str) and "/" in value else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def group_rows(folds):
    """One Row per configuration (folds whose configs agree in everything but the fold and how they ran), in
    the order first met, its folds in fold order; the settings that differ between rows label them."""
    by_protocol = {}
    for fold in folds:
        by_protocol.setdefault(json.dumps(protocol(fold.config), sort_keys=True, default=str), []).append(fold)
    groups = [sorted(g, key=lambda f: (f.config.get("fold", 0), str(f.run_dir))) for g in by_protocol.values()]
    protocols = [protocol(g[0].config) for g in groups]
    keys = {k for p in protocols for k in p if any(q.get(k) != p.get(k) for q in protocols)}
    keys = sorted(keys, key=lambda k: (KEY_ORDER.index(k) if k in KEY_ORDER else len(KEY_ORDER), k)) or ["encoder"]
    return [Row(", ".join(f"{k}={_shown(p.get(k))}" for k in keys), {k: p.get(k) for k in keys}, g)
            for p, g in zip(protocols, groups)], keys


def match_folds(rows):
    """Each row's folds in the first row's order, matched by their test images; refuses rows whose folds are not
    the same test images, and two runs of one fold in a row."""
    for row in rows:
        seen = {}
        for fold in row.folds:
            other = seen.setdefault(frozenset(fold.ids), fold)
            if other is not fold:
                raise UserError(f"compare: {other.run_dir} and {fold.run_dir} are one configuration tested on the "
                                f"same images ({fold.name}); pass one of them")
    order = {frozenset(f.ids): k for k, f in enumerate(rows[0].folds)}
    fix = ("compare runs of one split: the same --data, --split, --folds and --seed, so one split manifest "
           "(runs/splits/ or --splits FILE)")
    matched = [rows[0]]
    for row in rows[1:]:
        for fold in row.folds:
            if frozenset(fold.ids) not in order:
                raise UserError(f"compare: rows '{rows[0].label}' and '{row.label}' were not tested on the same "
                                f"images: {fold.run_dir} ({fold.name}, {len(fold.ids)} test images) matches no fold "
                                f"of the first; {fix}")
        mine = {frozenset(f.ids): f for f in row.folds}
        missing = [f for f in rows[0].folds if frozenset(f.ids) not in mine]
        if missing:
            raise UserError(f"compare: row '{row.label}' has no run tested on the images of {missing[0].run_dir} "
                            f"({missing[0].name}); finish that fold or leave it out of every row; {fix}")
        matched.append(row._replace(folds=[mine[frozenset(f.ids)] for f in rows[0].folds]))
    return matched


def stats(values):
    """{mean, std_n1 (sample, n-1), std_n (population, n), n} over the defined values; one value has no std."""
    defined = [float(v) for v in values if v is not None]
    spread = len(defined) > 1
    return {"mean": float(np.mean(defined)) if defined else None,
            "std_n1": float(np.std(defined, ddof=1)) if spread else None,
            "std_n": float(np.std(defined)) if spread else None, "n": len(defined)}


def _cost(folds):
    costs = [f.cost for f in folds if f.cost]
    rates = [f.img_s for f in folds if f.img_s]
    first = costs[0] if costs else {}
    hours = [c.get("gpu_hours") for c in costs]
    return {"params": first.get("params"), "gflops": first.get("gflops"), "img_size": folds[0].config.get("img_size"),
            "train_img_s": float(np.mean(rates)) if rates else None,
            "wall_seconds_per_fold": float(np.mean([c["wall_seconds"] for c in costs])) if costs else None,
            "gpu_hours": sum(hours) if costs and len(costs) == len(folds) and None not in hours else None,
            "devices": f"{first['world_size']}x {first['device_name']}" if first else None,
            "folds_with_cost": len(costs)}


def summarise(row, names):
    """A row's numbers: per fold, and mean ± std over folds of each metric; the cost of its runs."""
    tests = [f.test for f in row.folds]
    out = {"label": row.label, "settings": row.settings, "select": row.folds[0].config.get("select"),
           "folds": [{"name": f.name, "run": str(f.run_dir), "source": f.source, "test_images": len(f.ids),
                      "miou": f.test["miou"], "binary_iou": f.test.get("binary_iou"),
                      "fullres_miou": f.fullres and f.fullres["miou"],
                      "fullres_binary_iou": f.fullres and f.fullres.get("binary_iou")} for f in row.folds],
           "miou": stats(t["miou"] for t in tests), "binary_iou": stats(t.get("binary_iou") for t in tests),
           "iou": {c: stats(t["iou"].get(c) for t in tests) for c in names},
           "fullres": {key: stats(f.fullres and f.fullres.get(key) for f in row.folds)
                       for key in ("miou", "binary_iou")},
           "cost": _cost(row.folds)}
    for column in GROUP_COLUMNS:
        groups = sorted({g for t in tests for g in t.get(f"by_{column}", {})})
        out[f"by_{column}"] = {g: stats(t.get(f"by_{column}", {}).get(g, {}).get("miou") for t in tests)
                               for g in groups}
    return out


def _aligned(fold, ids):
    index = {i: k for k, i in enumerate(fold.ids)}
    return fold.matrices[[index[i] for i in ids]].reshape(len(ids), -1).astype(np.float64)


def resampled_miou(rows, resamples, seed):
    """(rows, resamples) mean-over-folds mIoU of each row on the same resampled test images: fold by fold (in
    order), rng.integers draws each fold's images with replacement (resamples x fold size, seeded), and every
    row's fold mIoU is metrics.mean_iou of the sum of its drawn per-image matrices. The draws are shared by all
    rows, which pairs the comparison."""
    rng = np.random.default_rng(seed)
    total = np.zeros((len(rows), resamples))
    for k, reference in enumerate(rows[0].folds):
        ids, size = reference.ids, len(reference.ids)
        draws = rng.integers(0, size, size=(resamples, size))
        counts = np.zeros((resamples, size))
        np.add.at(counts, (np.arange(resamples)[:, None], draws), 1)
        classes = reference.matrices.shape[-1]
        for r, row in enumerate(rows):
            summed = counts @ _aligned(row.folds[k], ids)
            total[r] += mean_iou(summed.reshape(resamples, classes, classes))
    return total / len(rows[0].folds)


def pairs(rows, summaries, resamples, seed, level):
    """For each pair of rows (a before b): the observed mean-over-folds mIoU difference a - b, its per-fold
    differences, the bootstrap's percentile interval at level, and the share of resamples in which the order
    flips (the resampled difference is zero or of the other sign)."""
    if len(rows) < 2:
        return []
    resampled = resampled_miou(rows, resamples, seed)
    out = []
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            observed = summaries[a]["miou"]["mean"] - summaries[b]["miou"]["mean"]
            differences = resampled[a] - resampled[b]
            low, high = np.quantile(differences, [(1 - level) / 2, (1 + level) / 2])
            flips = (None if observed == 0 else
                     float(np.mean(differences <= 0) if observed > 0 else np.mean(differences >= 0)))
            out.append({"a": rows[a].label, "b": rows[b].label, "difference": observed,
                        "per_fold": [fa.test["miou"] - fb.test["miou"] for fa, fb in zip(rows[a].folds, rows[b].folds)],
                        "interval": [float(low), float(high)], "level": level, "flip_share": flips,
                        "resamples": resamples, "seed": seed})
    return out


def provenance(rows, resamples, seed):
    """The sentences that say where every number comes from: selection rule, evaluation, std convention."""
    selects = sorted({str(r.folds[0].config.get("select")) for r in rows})
    rules = ", ".join(f"{s} = {SELECTION.get(s, '?')}" for s in selects)
    select = (f"--select {selects[0]} ({SELECTION.get(selects[0], '?')}) in every row" if len(selects) == 1
              else f"--select per row (column select: {rules})")
    works = sorted({r.folds[0].config.get("work_size") for r in rows}, key=str)
    scale = ("each whole image squashed to --img-size (--work-size 0)" if works == [0] else
             f"each test image resized to a {works[0]} px long side and predicted whole with --img-size tiles"
             if len(works) == 1 else "each test image resized to its row's --work-size and predicted whole with tiles")
    sources = sorted({f.source for r in rows for f in r.folds})
    n_images = sum(len(f.ids) for f in rows[0].folds)
    return {"selection": f"Checkpoint of each fold selected by {select}; the test fold is scored once.",
            "working_scale": f"Working scale: {scale}, scored against its mask at that scale (from "
                             f"{', '.join(SOURCES[s] for s in sources)}).",
            "full_res": "Full resolution: the same best.pt predicted the same way, resized back and scored over every "
                        "original pixel (train.py --full-res or --eval-only --full-res: eval-test-fullres.json); — "
                        "where a fold has none.",
            "std": "mean ± std over folds: std with n-1 (sample) first, [std with n (population)] in brackets; one "
                   "fold shows its value alone.",
            "bootstrap": f"Paired bootstrap over the {n_images} test images of all folds: {resamples} resamples, seed "
                         f"{seed}, each fold's images drawn with replacement, mIoU recomputed per fold from per-image "
                         "confusion matrices and averaged over folds."}


def _pct(s, brackets=True):
    if s["mean"] is None:
        return "—"
    if s["std_n1"] is None:
        return f"{100 * s['mean']:.2f}"
    return f"{100 * s['mean']:.2f} ± {100 * s['std_n1']:.2f}" + (f" [{100 * s['std_n']:.2f}]" if brackets else "")


def _num(value, fmt):
    return "—" if value is None else format(value, fmt)


def _share(value):
    return "—" if value is None else f"{100 * value:.1f} %"


def _hours(seconds):
    if seconds is None:
        return "—"
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def main_columns(summaries, keys, with_fullres):
    """(header, cells per row) of the main table, shared by Markdown, CSV-free views and LaTeX."""
    img = summaries[0]["cost"]["img_size"]
    header = [*keys, "folds", "test mIoU %", "damage-vs-clean IoU %"]
    header += ["full-res mIoU %", "full-res damage IoU %"] if with_fullres else []
    header += ["params (M)", f"GFLOPs / {img} px crop", "train img/s", "wall time / fold", "GPU-hours", "devices"]
    rows = []
    for s in summaries:
        cost = s["cost"]
        cells = [_shown(s["settings"][k]) for k in keys]
        cells += [str(len(s["folds"])), _pct(s["miou"]), _pct(s["binary_iou"])]
        cells += [_pct(s["fullres"]["miou"]), _pct(s["fullres"]["binary_iou"])] if with_fullres else []
        cells += [_num(cost["params"] and cost["params"] / 1e6, ".2f"), _num(cost["gflops"], ".2f"),
                  _num(cost["train_img_s"], ".1f"), _hours(cost["wall_seconds_per_fold"]),
                  _num(cost["gpu_hours"], ".2f"), cost["devices"] or "—"]
        rows.append(cells)
    return header, rows


def _md_table(header, rows):
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def markdown(table):
    summaries, keys, names = table["rows"], table["keys"], table["classes"]
    text = table["provenance"]
    with_fullres = any(s["fullres"]["miou"]["n"] for s in summaries)
    folds = ", ".join(f"{f['name']} ({f['test_images']} test images)" for f in summaries[0]["folds"])
    count = len(summaries[0]["folds"])
    lines = [f"# {len(summaries)} configuration{'s' * (len(summaries) > 1)} over {count} fold{'s' * (count > 1)}, "
             "the same test images", "",
             text["selection"], text["working_scale"] + (" " + text["full_res"] if with_fullres else ""), text["std"],
             f"Folds: {folds}.", "", "## Test mIoU and cost", ""]
    lines += _md_table(*main_columns(summaries, keys, with_fullres)) + ["", "## Test mIoU % per fold", ""]
    lines += _md_table(["configuration", *(f["name"] for f in summaries[0]["folds"])],
                       [[s["label"], *(f"{100 * f['miou']:.2f}" for f in s["folds"])] for s in summaries])
    lines += ["", "## Per-class IoU % (mean ± std over folds, n-1)", ""]
    lines += _md_table(["class", *(s["label"] for s in summaries)],
                       [[c, *(_pct(s["iou"][c], False) for s in summaries)] for c in names])
    for column in GROUP_COLUMNS:
        groups = sorted({g for s in summaries for g in s[f"by_{column}"]})
        if groups:
            lines += ["", f"## mIoU % per {column} (mean ± std over the folds that test it, n-1)", ""]
            lines += _md_table([column, *(s["label"] for s in summaries)],
                               [[g, *(_pct(s[f"by_{column}"].get(g, stats([])), False) for s in summaries)]
                                for g in groups])
    if table["pairs"]:
        level = round(100 * table["pairs"][0]["level"])
        lines += ["", "## Is the difference real?", "", text["bootstrap"], ""]
        lines += _md_table(["A", "B", "mIoU A − B (points)", "per fold", f"{level} % interval", "order flips"],
                           [[p["a"], p["b"], f"{100 * p['difference']:+.2f}",
                             ", ".join(f"{100 * d:+.2f}" for d in p["per_fold"]),
                             f"{100 * p['interval'][0]:+.2f} to {100 * p['interval'][1]:+.2f}",
                             _share(p["flip_share"])] for p in table["pairs"]])
    return "\n".join(lines) + "\n"


def _flat(prefix, s):
    return {f"{prefix}_mean": s["mean"], f"{prefix}_std_n1": s["std_n1"], f"{prefix}_std_n": s["std_n"],
            f"{prefix}_folds": s["n"]}


def csv_rows(table):
    """comparison.csv's rows: one per configuration, every number in its own column (fractions, not %)."""
    out = []
    for s in table["rows"]:
        row = {**{k: s["settings"][k] for k in table["keys"]}, "select": s["select"], "folds": len(s["folds"]),
               **_flat("test_miou", s["miou"]), **_flat("test_binary_iou", s["binary_iou"]),
               **_flat("fullres_miou", s["fullres"]["miou"]), **_flat("fullres_binary_iou", s["fullres"]["binary_iou"])}
        for c in table["classes"]:
            row.update(_flat(f"iou[{c}]", s["iou"][c]))
        for column in GROUP_COLUMNS:
            for g, value in s[f"by_{column}"].items():
                row.update(_flat(f"{column}[{g}]_miou", value))
        row.update({k: v for k, v in s["cost"].items()}, runs=" ".join(f["run"] for f in s["folds"]))
        out.append(row)
    return out


def _write_csv(path, rows):
    import csv
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


TEX = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                     "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                     "±": r"$\pm$", "—": "--", "−": "-"})


def tex_table(header, rows, left, comment):
    """A booktabs tabular (\\usepackage{booktabs}) to \\input inside the paper's table environment: the first left
    columns flush left, the numbers flush right, comment as % lines above it."""
    spec = "l" * left + "r" * (len(header) - left)
    lines = [f"% {line}" for line in comment] + [rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                                                  " & ".join(h.translate(TEX) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(str(c).translate(TEX) for c in cells) + r" \\" for cells in rows]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def chart(table, path):
    """comparison.png: test mIoU per configuration (mean, std n-1 as error bar, each fold a dot) over per-class IoU
    grouped bars (one bar per configuration; "n/a" where a class was never in a fold's truth or prediction)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter
    summaries, names = table["rows"], table["classes"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(10, 0.9 * len(names) + 2), 9), layout="constrained",
                                      height_ratios=(1, 1.3))
    colours = plt.get_cmap("tab10").colors
    width = 0.8 / len(summaries)
    for k, s in enumerate(summaries):
        colour = colours[k % len(colours)]
        bar = top.bar(k, s["miou"]["mean"], 0.5, yerr=s["miou"]["std_n1"] or 0, capsize=6, color=colour, alpha=0.8)
        top.bar_label(bar, labels=[f"{100 * s['miou']['mean']:.2f} %"], padding=4)
        top.scatter([k] * len(s["folds"]), [f["miou"] for f in s["folds"]], color="black", s=14, zorder=3)
        xs = np.arange(len(names)) + (k - (len(summaries) - 1) / 2) * width
        means = [s["iou"][c]["mean"] for c in names]
        errors = [s["iou"][c]["std_n1"] or 0 for c in names]
        bottom.bar(xs, [np.nan if m is None else m for m in means], width, yerr=errors, capsize=2, color=colour,
                   alpha=0.8, label=s["label"])
        for x, m in zip(xs, means):
            if m is None:
                bottom.text(x, 0.02, "n/a", rotation=90, ha="center", fontsize=7, color="0.4")
    top.set_xticks(range(len(summaries)), [s["label"] for s in summaries], rotation=15, ha="right")
    top.set_xlim(-0.75, len(summaries) - 0.25)
    top.set_ylim(0, 1.25 * max(s["miou"]["mean"] + (s["miou"]["std_n1"] or 0) for s in summaries) or 1)
    top.set(ylabel="test mIoU (%)", title="test mIoU per configuration: mean over folds, error bar std (n-1), dots: "
            "folds")
    bottom.set_xticks(range(len(names)), names, rotation=45, ha="right")
    bottom.set(ylim=(0, 1), ylabel="IoU (%)", title="per-class test IoU: mean over folds, error bar std (n-1)")
    for ax in (top, bottom):
        # The values are fractions; the axes read in % like the bar labels and the tables.
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=min(len(summaries), 4), fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(paths, out=None, resamples=1000, seed=42, level=0.95):
    """Reads the runs, writes every output into out (default: beside the runs, comparison/); returns the table."""
    if resamples < 1 or not 0 < level < 1:
        raise UserError(f"--resamples {resamples} / --level {level}: need at least 1 resample and a level in (0, 1)")
    folds = [read_fold(d) for d in find_runs(paths)]
    wheres = [str(f.run_dir / "config.json") for f in folds]
    scheme = same_scheme([config_scheme(f.config, w) for f, w in zip(folds, wheres)], wheres,
                         "compare runs of one label scheme")
    rows, keys = group_rows(folds)
    rows = match_folds(rows)
    summaries = [summarise(r, scheme.names) for r in rows]
    table = {"keys": keys, "classes": list(scheme.names), "provenance": provenance(rows, resamples, seed),
             "rows": summaries, "pairs": pairs(rows, summaries, resamples, seed, level)}
    out = Path(out) if out else Path(os.path.commonpath([f.run_dir.resolve() for f in folds])) / "comparison"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror}); pass a writable folder") from None
    write_outputs(table, out)
    return table


def write_outputs(table, out):
    text = markdown(table)
    print(text, end="")
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps(table, indent=1))
    _write_csv(out / "comparison.csv", csv_rows(table))
    _write_csv(out / "comparison-pairs.csv", [{**p, "per_fold": " ".join(map(str, p["per_fold"])),
                                              "interval": " ".join(map(str, p["interval"]))} for p in table["pairs"]])
    summaries, text = table["rows"], table["provenance"]
    with_fullres = any(s["fullres"]["miou"]["n"] for s in summaries)
    comment = [text["selection"], text["working_scale"], *[text["full_res"]] * with_fullres, text["std"]]
    header, rows = main_columns(summaries, table["keys"], with_fullres)
    (out / "comparison.tex").write_text(tex_table(header, rows, len(table["keys"]), comment))
    (out / "comparison-classes.tex").write_text(tex_table(
        ["class", *(s["label"] for s in summaries)],
        [[c, *(_pct(s["iou"][c], False) for s in summaries)] for c in table["classes"]], 1, comment))
    chart(table, out / "comparison.png")
    print(f"wrote comparison.md, .csv, .tex, .json, comparison-classes.tex, comparison-pairs.csv and comparison.png "
          f"in {out}", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_PARENT",
                        help="run folders of train.py, or folders above them (searched recursively)")
    parser.add_argument("--out", default=None, help="folder for the outputs (default: FIRST_PATH/comparison)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the test images")
    parser.add_argument("--seed", type=int, default=42, help="seed of the bootstrap's draws")
    parser.add_argument("--level", type=float, default=0.95, help="level of the bootstrap interval (0-1)")
    args = parser.parse_args(argv)
    return run_cli(compare, args.paths, args.out, args.resamples, args.seed, args.level)


if __name__ == "__main__":
    sys.exit(main())
