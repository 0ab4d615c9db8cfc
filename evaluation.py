"""Scoring a model on a split: dataset-level confusion matrices summed over ranks, each image counted once,
at the training size or tiled at the images' own resolution; `train.py --eval-only` runs eval_only."""
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
from checkpoint import MODEL_KEYS, load_checkpoint, model_from_checkpoint
from distributed import all_reduce
from files import read_image, read_mask
from labels import HEAD_NAMES, NUM_CLASSES, UserError
from losses import hierarchy_targets
from metrics import confusion, eval_metrics
from model import autocast
from tiles import predict_image


def _common_batches(pre, batch):
    """Batches every rank evaluates (its eval_shard), the least over ranks: each may poll that often."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return min(-(-len(data.eval_shard(len(pre), r, world)) // batch) for r in range(world))


@torch.no_grad()
def evaluate(model, pre, indices, cfg, device, preemption=None):
    """Dataset-level confusion matrices (one per head), summed over ranks; each sample is counted once.

    With a preemption flag it is polled after each batch all ranks share; None means a SIGTERM came first.
    """
    polls = _common_batches(pre, cfg["micro_batch"]) if preemption else 0
    model.eval()
    heads = list(HEAD_NAMES) if cfg["heads"] == "hierarchical" else ["fine"]
    cms = {h: torch.zeros(len(HEAD_NAMES[h]), len(HEAD_NAMES[h]), dtype=torch.long, device=device) for h in heads}
    for i, (images, masks) in enumerate(data.batches(pre, indices, cfg["micro_batch"], pin=device.type == "cuda")):
        if i < polls and preemption.poll():
            model.train()
            return None
        x, y = data.to_device_batch(images, masks, device, channels_last=cfg["channels_last"])
        with autocast(cfg["precision"], device):
            outputs = model(x)
        targets = hierarchy_targets(y) if len(heads) > 1 else {"fine": y}
        outputs = outputs if isinstance(outputs, dict) else {"fine": outputs}
        for h in heads:
            cms[h] += confusion(outputs[h].argmax(1), targets[h], len(HEAD_NAMES[h]))
    model.train()
    return {h: all_reduce(cm) for h, cm in cms.items()}


def evaluate_full_res(model, samples, rank, world, cfg, device):
    """Tiled prediction at each val image's own resolution; confusion matrix over every original pixel."""
    model.eval()
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for i in data.eval_shard(len(samples), rank, world).tolist():
        image = read_image(samples[i].image)
        mask = read_mask(samples[i].mask, image.shape[:2])
        pred = predict_image(model, image, tile=cfg["img_size"], device=device, precision=cfg["precision"])
        # read_mask's array is read-only; astype gives torch a writable copy in the dtype it needs anyway.
        cm += confusion(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)),
                        NUM_CLASSES)
    return {"fine": all_reduce(cm.to(device))}


# The split must be the one the model was trained on, or its validation images may have been trained on.
EVAL_KEYS = MODEL_KEYS + ("split", "fold", "folds", "seed", "synthetic_count", "synthetic_size")


def eval_only(cfg, rank, world, local_rank, local_world, device):
    path = cfg["checkpoint"] or Path(cfg["run_dir"]) / "best.pt"
    checkpoint = load_checkpoint(path)
    trained = checkpoint["config"]
    missing = [key for key in EVAL_KEYS + ("data",) if key not in trained]
    if missing:
        raise UserError(f"--checkpoint {path}: its config lacks {', '.join(missing)}; pass a checkpoint written by "
                        "this version of train.py")
    cfg.update({key: trained[key] for key in EVAL_KEYS}, data=cfg["data_flag"] or trained["data"])
    model = model_from_checkpoint(checkpoint, path).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    _, val_pre, val_samples = data.load_split(cfg, local_rank, local_world, train_needed=False)
    if cfg["full_res"]:
        cms = evaluate_full_res(model, val_samples, rank, world, cfg, device)
    else:
        cms = evaluate(model, val_pre, data.eval_shard(len(val_pre), rank, world), cfg, device)
    metrics = eval_metrics(cms)
    if rank == 0:
        print(json.dumps({"checkpoint": str(path), "full_res": cfg["full_res"], **metrics}, indent=1), flush=True)
    return metrics
