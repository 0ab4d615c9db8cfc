"""Scoring a model on one part of a fold: dataset-level confusion matrices summed over ranks, each image counted
once, per head and per metadata group, and on request per image (what compare.py's bootstrap resamples). Images are
predicted whole at the working scale the model trained at, with predict.py's tiles and padding (the preload's
padding cut off first; averaged over flips with --eval-tta flip, as predict.py --tta), and scored there (or,
--full-res, at their own resolution, the labels taken back to it as predict.py takes them). `train.py
--eval-only` runs eval_only (the checkpoint's test fold by default, with the checkpoint's label scheme)."""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import data
from checkpoint import MODEL_KEYS, check_scheme, checkpoint_scheme, load_checkpoint, model_from_checkpoint
from distributed import all_reduce
from files import displayed_size, mask_strips, scaled_shape
from labels import UserError, progress, scheme_summary, scheme_to_dict
from losses import hierarchy_targets, label_tables
from metrics import confusion, confusion_record, eval_metrics
from runs import per_image_path, write_per_image
from strips import strip_rows
from tiles import Tiling, label_strips, predict_image
from writes import atomic_write


PROGRESS_MIN_IMAGES = 50
# Tiles per forward pass in --eval-only when neither --micro-batch nor the checkpoint says (as predict.py).
TILE_BATCH = 8


def _common_count(n, world):
    """Images every rank evaluates (its eval_shard), the least over ranks: each may poll that often."""
    return min(len(data.eval_shard(n, r, world)) for r in range(world))


def _group_ids(part):
    """{column: (group names, group id per sample)} of the part's metadata groups."""
    out = {}
    for column, values in part.groups.items():
        names = sorted(set(values))
        out[column] = names, [names.index(v) for v in values]
    return out


def _empty(cfg, part, scheme, per_image):
    names, size = scheme.head_names, scheme.num_classes
    heads = list(names) if cfg["heads"] == "hierarchical" else ["fine"]
    cms = {h: torch.zeros(len(names[h]), len(names[h]), dtype=torch.long) for h in heads}
    for column, values in part.groups.items():
        cms[f"by_{column}"] = torch.zeros(len(set(values)), size, size, dtype=torch.long)
    if per_image:
        # One fine matrix per image of the part; each rank fills its own images, the sum over ranks all of them.
        cms["per_image"] = torch.zeros(len(part.samples), size, size, dtype=torch.long)
    return cms


def _count(cms, groups, row, labels, mask, scheme):
    """Adds one image's (prediction, truth) pixels to every matrix. The coarse and binary scores of a
    hierarchical model are its fine prediction grouped, the map predict.py draws."""
    pred = torch.from_numpy(labels.astype(np.int64))
    # read_mask's and the preload's arrays are read-only; astype gives torch a writable copy in its dtype.
    truth = torch.from_numpy(mask.astype(np.int64))
    cm = confusion(pred, truth, scheme.num_classes, scheme.ignore)
    cms["fine"] += cm
    if "coarse" in cms:
        tables = label_tables(scheme)
        grouped_pred, grouped_truth = hierarchy_targets(pred, tables), hierarchy_targets(truth, tables)
        for head in ("coarse", "binary"):
            cms[head] += confusion(grouped_pred[head], grouped_truth[head], len(cms[head]), scheme.ignore)
    for column, (_, ids) in groups.items():
        cms[f"by_{column}"][ids[row]] += cm
    if "per_image" in cms:
        cms["per_image"][row] += cm  # a full-res image arrives a strip at a time


def _reduced(cms, groups, device):
    """Sums over ranks (on the device, as NCCL needs); grouped matrices become {group name: matrix}."""
    out = {}
    for key, cm in cms.items():
        cm = all_reduce(cm.to(device))
        out[key] = dict(zip(groups[key[3:]][0], cm)) if key.startswith("by_") else cm
    return out


def tta_of(cfg):
    """Whether to average over flips: --eval-tta flip; a config from before the flag means none."""
    return cfg.get("eval_tta", "none") == "flip"


def working_image(part, row, cfg):
    """A part's image at its working size without the preload's padding (black, for training crops):
    predict_image pads it as it pads predict.py's images."""
    height, width = scaled_shape(*displayed_size(part.samples[row].image), cfg["img_size"], cfg.get("work_size", 0))
    return part.pre.image(row)[:height, :width]


def working_labels(model, part, row, run):
    """A part's image predicted at its working size, whole, with predict.py's overlapping blended tiles at the
    crop size (the run's micro-batch of tiles at a time, its --eval-tta and precision)."""
    cfg = run.cfg
    tiling = Tiling(cfg["img_size"], batch_size=cfg["micro_batch"], tta=tta_of(cfg), device=run.device,
                    precision=cfg["precision"])
    return predict_image(model, working_image(part, row, cfg), tiling)


@torch.no_grad()
def evaluate(model, part, run, preemption=None, per_image=False):
    """{fine, coarse, binary (hierarchical heads), by_material, by_content: {group: matrix}} confusion matrices
    of a part at the working scale: each image is predicted whole with predict.py's overlapping blended tiles
    and scored pixel by pixel; summed over ranks. per_image adds "per_image": (images, C, C), each image's fine
    matrix in part.samples order. With a preemption flag it is polled after each image all ranks share; None
    means a SIGTERM came first."""
    cfg, device = run.cfg, run.device
    polls = _common_count(len(part.pre), run.world) if preemption else 0
    scheme = part.pre.scheme
    groups, cms = _group_ids(part), _empty(cfg, part, scheme, per_image)
    shard = data.eval_shard(len(part.pre), run.rank, run.world).tolist()
    # Lines only for a long evaluation (an ARTeFACT test fold); a short one is reported by its epoch line.
    show = progress("evaluation: images", len(shard)) if len(shard) >= PROGRESS_MIN_IMAGES else None
    for k, row in enumerate(shard):
        if k < polls and preemption.poll():
            return None
        labels = working_labels(model, part, row, run)
        _count(cms, groups, row, labels, part.pre.mask(row)[:labels.shape[0], :labels.shape[1]], scheme)
        if show:
            show(k + 1)
    return _reduced(cms, groups, device)


def full_res_labels(model, part, row, run):
    """((height, width) of the image as displayed, its label map at the working scale): evaluate's prediction,
    which label_strips takes to full resolution as predict.py does."""
    return displayed_size(part.samples[row].image), working_labels(model, part, row, run)


@torch.no_grad()
def evaluate_full_res(model, part, run, per_image=False):
    """The same prediction at the working scale, resized back to each image's own resolution and scored over
    every original pixel (what predict.py's damage map shows), a strip of rows at a time; per_image as in
    evaluate."""
    cfg, device, scheme = run.cfg, run.device, part.pre.scheme
    groups, cms = _group_ids(part), _empty(cfg, part, scheme, per_image)
    for row in data.eval_shard(len(part.samples), run.rank, run.world).tolist():
        (height, width), labels = full_res_labels(model, part, row, run)
        rows = strip_rows(width)
        truths = mask_strips(part.samples[row].mask, scheme, (height, width), rows)
        for (_, strip), truth in zip(label_strips(labels, height, width, rows), truths):
            _count(cms, groups, row, strip, truth, scheme)
    return _reduced(cms, groups, device)


def scores(cms, cfg):
    """The metrics record of evaluate's matrices, with how they were predicted: "tta" (--eval-tta) and
    "weights" ("ema" when the weight average was scored, else "model")."""
    weights = "ema" if cfg["ema"] else "model"
    return {**eval_metrics(cms, data.run_scheme(cfg)), "tta": cfg["eval_tta"], "weights": weights}


# The split must be the one the model was trained on, or its test images may have been trained on.
EVAL_KEYS = MODEL_KEYS + ("split", "fold", "folds", "seed", "synthetic_count", "synthetic_size", "select",
                          "inner_frac", "work_size")


def _eval_scheme(cfg, checkpoint, path):
    """The run config's scheme entries for --eval-only: the checkpoint's scheme, refused when the dataset's
    (--classes FILE or DATA/classes.json; a folder with neither is taken to hold the checkpoint's, with a note)
    differs from it."""
    trained = checkpoint_scheme(checkpoint, path)
    dataset, source = data.data_scheme(cfg["data"], cfg["classes_file"], (trained, f"the scheme of {path}"))
    check_scheme(trained, dataset, source, f"--checkpoint {path}: trained")
    return {"classes": scheme_to_dict(trained), "num_classes": trained.num_classes, "classes_source": source}


def eval_only(run):
    """Scores a checkpoint on its own fold's test part (or --eval-split val); prints and returns the record."""
    cfg, rank, device = run.cfg, run.rank, run.device
    path = cfg["checkpoint"] or Path(cfg["run_dir"]) / "best.pt"
    checkpoint = load_checkpoint(path)
    trained = checkpoint["config"]
    missing = [key for key in EVAL_KEYS + ("data",) if key not in trained]
    if missing:
        raise UserError(f"--checkpoint {path}: its config lacks {', '.join(missing)}; pass a checkpoint written by "
                        "this version of train.py")
    # An explicit flag the checkpoint contradicts is refused: scored anyway, another fold's test part could hold
    # images this model was trained on.
    given = set(cfg.get("given_flags", ()))
    contradicted = [f"--{key.replace('_', '-')} {cfg[key]} (trained with {trained[key]})" for key in EVAL_KEYS
                    if key in given and cfg[key] != trained[key]]
    if contradicted:
        raise UserError(f"--checkpoint {path}: {'; '.join(contradicted)}; --eval-only scores the split, fold and "
                        "model the checkpoint was trained for (another fold's test images may be in its training "
                        "set): drop those flags, or pass that fold's own checkpoint")
    cfg.update({key: trained[key] for key in EVAL_KEYS}, data=cfg["data_flag"] or trained["data"],
               splits=cfg["splits"] or trained.get("splits"), run_dir=trained.get("run_dir", cfg["run_dir"]),
               micro_batch=cfg["micro_batch"] or trained.get("micro_batch") or TILE_BATCH)
    cfg.update(_eval_scheme(cfg, checkpoint, path))
    if rank == 0:
        print(f"label scheme: {scheme_summary(data.run_scheme(cfg))} ({cfg['classes_source']})", file=sys.stderr,
              flush=True)
    # model_from_checkpoint takes the EMA weights where the run kept them; the record says which were scored.
    cfg["ema"] = "ema" in checkpoint
    model = model_from_checkpoint(checkpoint, path).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    part = data.load_split(cfg, run.local_rank, run.local_world, needed=(cfg["eval_split"],))[cfg["eval_split"]]
    if not part.samples:
        raise UserError(f"--eval-split {cfg['eval_split']}: that part of the fold is empty (a --select last run "
                        "has no inner validation split)")
    if cfg["full_res"]:
        cms = evaluate_full_res(model, part, run, per_image=True)
    else:
        cms = evaluate(model, part, run, per_image=True)
    record = {"checkpoint": str(path), "full_res": cfg["full_res"], "select": trained.get("select"),
              "epoch": checkpoint.get("epoch"), "held_out": trained.get("held_out"),
              cfg["eval_split"]: scores(cms, cfg)}
    if rank == 0:
        print(json.dumps(record, indent=1), flush=True)
        # Saved beside the checkpoint, so the numbers and their matrices outlive the terminal.
        write_evaluation(Path(path).parent / (f"eval-{cfg['eval_split']}{'-fullres' if cfg['full_res'] else ''}"
                                              f"{'-tta' if cfg['eval_tta'] != 'none' else ''}.json"), record, cms, part)
    return record


def test_full_res(model, part, run, epoch):
    """train.py --full-res: the selected checkpoint (in model) scored on the test part at full resolution once
    the test is done, saved as --eval-only --full-res saves it (RUN_DIR/eval-test-fullres.json)."""
    cfg = run.cfg
    cms = evaluate_full_res(model, part, run, per_image=True)
    record = {"checkpoint": str(Path(cfg["run_dir"]) / "best.pt"), "full_res": True, "select": cfg["select"],
              "epoch": epoch, "held_out": cfg.get("held_out"), "test": scores(cms, cfg)}
    if run.rank == 0:
        write_evaluation(Path(cfg["run_dir"]) / "eval-test-fullres.json", record, cms, part)
    return record


def write_evaluation(path, record, cms, part):
    """Rank 0: an evaluation record with its confusion matrices (eval-*.json) and each image's fine matrix beside
    it (eval-*_per_image.npz); a failed write is a note, the scores were printed or logged."""
    per_image = cms.pop("per_image")
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({**record, "confusion": confusion_record(cms)})))
        write_per_image(per_image_path(path), [s.id for s in part.samples], per_image)
        print(f"wrote {path} and {per_image_path(path).name}", file=sys.stderr, flush=True)
    except (OSError, UserError) as exc:
        print(f"note: could not save {path} ({getattr(exc, 'strerror', None) or exc}); the scores are above",
              file=sys.stderr, flush=True)
