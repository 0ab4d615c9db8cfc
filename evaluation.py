"""Scoring a model on one part of a fold: dataset-level confusion matrices summed over ranks, each image counted
once, per head and per metadata group, at the training size or tiled at the images' own resolution.
`train.py --eval-only` runs eval_only (the checkpoint's test fold by default)."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
from checkpoint import MODEL_KEYS, load_checkpoint, model_from_checkpoint
from distributed import all_reduce
from files import atomic_write, read_image, read_mask
from labels import HEAD_NAMES, NUM_CLASSES, UserError
from losses import hierarchy_targets
from metrics import confusion, confusion_record, eval_metrics
from model import autocast
from tiles import predict_image


def _common_batches(n, batch):
    """Batches every rank evaluates (its eval_shard), the least over ranks: each may poll that often."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return min(-(-len(data.eval_shard(n, r, world)) // batch) for r in range(world))


def _group_ids(part, device):
    """{column: (group names, group id per sample on device)} of the part's metadata groups."""
    out = {}
    for column, values in part.groups.items():
        names = sorted(set(values))
        out[column] = names, torch.tensor([names.index(v) for v in values], device=device)
    return out


def _empty(cfg, part, device):
    heads = list(HEAD_NAMES) if cfg["heads"] == "hierarchical" else ["fine"]
    cms = {h: torch.zeros(len(HEAD_NAMES[h]), len(HEAD_NAMES[h]), dtype=torch.long, device=device) for h in heads}
    for column, values in part.groups.items():
        cms[f"by_{column}"] = torch.zeros(len(set(values)), NUM_CLASSES, NUM_CLASSES, dtype=torch.long, device=device)
    return cms


def _reduced(cms, groups):
    """Sums over ranks; grouped matrices become {group name: matrix}."""
    out = {}
    for key, cm in cms.items():
        all_reduce(cm)
        out[key] = dict(zip(groups[key[3:]][0], cm)) if key.startswith("by_") else cm
    return out


@torch.no_grad()
def evaluate(model, part, cfg, device, rank=0, world=1, preemption=None):
    """{fine, coarse, binary (hierarchical heads), by_material, by_content: {group: matrix}} confusion matrices
    of a part at the training size, summed over ranks. With a preemption flag it is polled after each batch all
    ranks share; None means a SIGTERM came first."""
    indices = data.eval_shard(len(part.pre), rank, world)
    polls = _common_batches(len(part.pre), cfg["micro_batch"]) if preemption else 0
    groups, cms = _group_ids(part, device), _empty(cfg, part, device)
    model.eval()
    start = 0
    for i, (images, masks) in enumerate(data.batches(part.pre, indices, cfg["micro_batch"],
                                                     pin=device.type == "cuda")):
        if i < polls and preemption.poll():
            model.train()
            return None
        x, y = data.to_device_batch(images, masks, device, channels_last=cfg["channels_last"])
        with autocast(cfg["precision"], device):
            outputs = model(x)
        targets = hierarchy_targets(y) if "coarse" in cms else {"fine": y}
        outputs = outputs if isinstance(outputs, dict) else {"fine": outputs}
        predictions = {h: outputs[h].argmax(1) for h in targets}
        for h in targets:
            cms[h] += confusion(predictions[h], targets[h], len(HEAD_NAMES[h]))
        rows = indices[start:start + len(images)].to(device)
        start += len(images)
        for column, (names, ids) in groups.items():
            cms[f"by_{column}"] += confusion(predictions["fine"], y, NUM_CLASSES, ids[rows], len(names))
    model.train()
    return _reduced(cms, groups)


def evaluate_full_res(model, part, rank, world, cfg, device):
    """Tiled prediction at each image's own resolution; confusion matrices over every original pixel."""
    model.eval()
    groups = _group_ids(part, "cpu")
    cms = {key: cm.cpu() for key, cm in _empty(dict(cfg, heads="fine"), part, "cpu").items()}
    for i in data.eval_shard(len(part.samples), rank, world).tolist():
        image = read_image(part.samples[i].image)
        mask = read_mask(part.samples[i].mask, image.shape[:2])
        # read_mask's array is read-only; astype gives torch a writable copy in the dtype it needs anyway.
        pred = torch.from_numpy(predict_image(model, image, tile=cfg["img_size"], device=device,
                                              precision=cfg["precision"]).astype(np.int64))
        truth = torch.from_numpy(mask.astype(np.int64))
        cms["fine"] += confusion(pred, truth, NUM_CLASSES)
        for column, (names, ids) in groups.items():
            cms[f"by_{column}"][ids[i]] += confusion(pred, truth, NUM_CLASSES)
    return _reduced({key: cm.to(device) for key, cm in cms.items()}, groups)


# The split must be the one the model was trained on, or its test images may have been trained on.
EVAL_KEYS = MODEL_KEYS + ("split", "fold", "folds", "seed", "synthetic_count", "synthetic_size", "select",
                          "inner_frac")


def eval_only(cfg, rank, world, local_rank, local_world, device):
    """Scores a checkpoint on its own fold's test part (or --eval-split val); prints and returns the record."""
    path = cfg["checkpoint"] or Path(cfg["run_dir"]) / "best.pt"
    checkpoint = load_checkpoint(path)
    trained = checkpoint["config"]
    missing = [key for key in EVAL_KEYS + ("data",) if key not in trained]
    if missing:
        raise UserError(f"--checkpoint {path}: its config lacks {', '.join(missing)}; pass a checkpoint written by "
                        "this version of train.py")
    cfg.update({key: trained[key] for key in EVAL_KEYS}, data=cfg["data_flag"] or trained["data"],
               splits=cfg["splits"] or trained.get("splits"), run_dir=trained.get("run_dir", cfg["run_dir"]))
    model = model_from_checkpoint(checkpoint, path).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    part = data.load_split(cfg, local_rank, local_world, needed=(cfg["eval_split"],))[cfg["eval_split"]]
    if not part.samples:
        raise UserError(f"--eval-split {cfg['eval_split']}: that part of the fold is empty (a --select last run "
                        "has no inner validation split)")
    if cfg["full_res"]:
        cms = evaluate_full_res(model, part, rank, world, cfg, device)
    else:
        cms = evaluate(model, part, cfg, device, rank, world)
    record = {"checkpoint": str(path), "full_res": cfg["full_res"], cfg["eval_split"]: eval_metrics(cms)}
    if rank == 0:
        print(json.dumps(record, indent=1), flush=True)
        # Saved beside the checkpoint, so the numbers and their matrices outlive the terminal.
        out = Path(path).parent / f"eval-{cfg['eval_split']}{'-fullres' if cfg['full_res'] else ''}.json"
        try:
            atomic_write(out, lambda tmp: tmp.write_text(json.dumps({**record, "confusion": confusion_record(cms)})))
            print(f"wrote {out}", file=sys.stderr, flush=True)
        except OSError as exc:
            print(f"note: could not save {out} ({exc.strerror}); the scores are above", file=sys.stderr, flush=True)
    return record
