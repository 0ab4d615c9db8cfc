"""Train, evaluate and benchmark a damage-segmentation model: DDP (torchrun or srun), AMP, honest mIoU, CV."""
import argparse
import contextlib
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from data import CLASS_NAMES, NUM_CLASSES, UserError
from losses import COARSE_NAMES, HierarchicalLoss, build_loss, hierarchy_targets
from model import ENCODERS, build_model, check_img_size, default_batch
import weights
from weights import METHODS

BASE_BATCH = 96
HEAD_CLASSES = {"fine": CLASS_NAMES, "coarse": COARSE_NAMES, "binary": ["Clean", "Damage"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="mit_b3", help=f"one of {', '.join(ENCODERS)} or any timm model name")
    p.add_argument("--decoder", default="unet", choices=["unet", "upernet"])
    p.add_argument("--heads", default="fine", choices=["fine", "hierarchical"])
    p.add_argument("--head-weights", default="0.2,0.3,0.5", help="binary,coarse,fine loss weights")
    p.add_argument("--norm", default="bn", choices=["bn", "gn"], help="decoder norm; gn is batch-independent")
    p.add_argument("--data", default=None, help="dataset folder (images/ + annotations/) or 'synthetic' (default; "
                   "--eval-only defaults to the checkpoint's)")
    p.add_argument("--synthetic-count", type=int, default=64)
    p.add_argument("--synthetic-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", default=None, help="global batch (default per encoder) or 'auto'")
    p.add_argument("--micro-batch", type=int, default=None, help="per-rank batch per forward; accumulates the rest")
    p.add_argument("--lr", type=float, default=1e-3, help="base LR at global batch 96; scaled by batch/96")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--pct-start", type=float, default=0.3)
    p.add_argument("--loss", default="dicefocal", choices=["dicefocal", "dice", "focal", "ce"])
    p.add_argument("--class-weights", default="inverse_sqrt_log_scaled", help=f"{'|'.join(METHODS)} or a JSON file")
    p.add_argument("--max-ratio", type=float, default=36.0)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--clip", type=float, default=None, help="gradient clipping max-norm (off by default)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--split", default="kfold", choices=["single", "kfold", "material", "content"])
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--offline-aug", action="store_true", help="add flipped/rotated copies of training images")
    p.add_argument("--preload", default="all", choices=["all", "val", "none"])
    p.add_argument("--run-dir", default=None, help="default runs/<encoder>-<decoder>-fold<K>")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only or --resume")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--full-res", action="store_true", help="evaluate tiled at the images' own resolution")
    p.add_argument("--pretrained", action="store_true", help="ImageNet encoder weights from the hub")
    p.add_argument("--weights", default=None, help="local encoder weights file")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-every", type=int, default=20, help="progress line every N steps")
    p.add_argument("--dist-timeout", type=int, default=600, help="seconds before a stuck collective fails")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip steps with a non-finite loss (syncs)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--bench", action="store_true", help="time the training step instead of training")
    p.add_argument("--bench-steps", type=int, default=20)
    p.add_argument("--bench-out", default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: detected)")
    p.add_argument("--summary", nargs="+", default=None, metavar="RUN_DIR", help="mean ± std over finished folds")
    return p.parse_args(argv)


def resolve_config(args, world_size, device):
    """Checks flags that need no data and derives batch, LR and precision; raises UserError naming the flag."""
    cfg = vars(args).copy()
    cfg.update(data=args.data or "synthetic", data_flag=args.data)
    if args.data not in (None, "synthetic") and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: folder not found; run `python data.py prepare` or use --data synthetic")
    if args.encoder not in ENCODERS and not _timm_knows(args.encoder):
        raise UserError(f"--encoder {args.encoder}: unknown; use one of {', '.join(ENCODERS)} or a timm model name")
    check_img_size(args.encoder, args.img_size)
    try:
        cfg["head_weights"] = [float(w) for w in args.head_weights.split(",")]
    except ValueError:
        cfg["head_weights"] = []
    if len(cfg["head_weights"]) != 3:
        raise UserError(f"--head-weights {args.head_weights}: give three numbers binary,coarse,fine e.g. 0.2,0.3,0.5")
    if args.batch_size in (None, "auto"):
        batch = default_batch(args.encoder)
    else:
        try:
            batch = int(args.batch_size)
        except ValueError:
            raise UserError(f"--batch-size {args.batch_size}: give a number or 'auto'") from None
    if batch < world_size or batch % world_size:
        raise UserError(f"--batch-size {batch}: must be a multiple of the {world_size} ranks; "
                        f"use {max(world_size, batch // world_size * world_size)}")
    per_rank = batch // world_size
    micro = args.micro_batch or per_rank
    if micro < 1 or per_rank % micro:
        raise UserError(f"--micro-batch {micro}: must divide the per-rank batch {per_rank}")
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: must be at least 1")
    if not 0 <= args.fold < max(args.folds, 1) and args.split == "kfold":
        raise UserError(f"--fold {args.fold}: must be in 0..{args.folds - 1} for --folds {args.folds}")
    if args.eval_only and not (args.checkpoint or args.run_dir):
        raise UserError("--eval-only: give --checkpoint PATH (e.g. runs/NAME/best.pt)")
    if args.full_res and not args.eval_only:
        raise UserError("--full-res: only with --eval-only (tiled full-resolution evaluation is slow)")
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16: needs a GPU; use bf16 or fp32 on CPU")
    cfg.update(batch_size=batch, per_rank_batch=per_rank, micro_batch=micro, accum_steps=per_rank // micro,
               lr=args.lr * batch / BASE_BATCH, base_lr=args.lr, precision=precision, world_size=world_size,
               channels_last=not args.no_channels_last, num_classes=NUM_CLASSES, device=device.type,
               run_dir=args.run_dir or f"runs/{args.encoder}-{args.decoder}-{args.split}{args.fold}")
    return cfg


def _timm_knows(name):
    import timm
    return name in timm.list_models() or name.split(".")[0] in timm.list_models()


def setup_distributed(timeout_s):
    """Rank, world and device from torchrun (RANK...) or srun (SLURM_PROCID...); NCCL on CUDA, gloo on CPU."""
    env = os.environ
    if "RANK" in env:
        rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", "29500")
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, local_rank, local_world, device


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(tensor, op)
    return tensor


def get_lr_schedule(optimizer, cfg, steps_per_epoch):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch,
                                               pct_start=cfg["pct_start"], anneal_strategy="cos")


def autocast(cfg, device):
    if cfg["precision"] in ("bf16", "fp16"):
        dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def confusion(pred, target, num_classes):
    """Confusion matrix (rows: truth, cols: prediction) of one batch, 255 ignored, without a host sync."""
    valid = target != data.IGNORE_INDEX
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


def make_criterion(cfg, class_weights, device):
    weight = torch.as_tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    if cfg["heads"] == "hierarchical":
        return HierarchicalLoss(cfg["loss"], weight, head_weights=tuple(cfg["head_weights"]))
    loss = build_loss(cfg["loss"], weight)

    def criterion(outputs, target):
        return loss(outputs.float(), target)
    return criterion


def train_step(model, criterion, optimizer, scheduler, scaler, micro_batches, cfg, device):
    """One optimizer step over the micro-batches; DDP syncs gradients only on the last micro-step.

    Returns the loss as a device tensor: reading it is left to the logging points, so the step never syncs
    unless --skip-nonfinite asks to check every step (all ranks must agree on skipping).
    """
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(cfg, device):
                outputs = model(x)
            loss = criterion(outputs, y) / len(micro_batches)
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if cfg["skip_nonfinite"] and not torch.isfinite(all_reduce(loss_sum.clone())):
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss_sum
    if cfg["clip"]:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return loss_sum


@torch.no_grad()
def evaluate(model, pre, indices, cfg, device):
    """Dataset-level confusion matrices (one per head), summed over ranks; each sample is counted once."""
    model.eval()
    heads = ["fine", "coarse", "binary"] if cfg["heads"] == "hierarchical" else ["fine"]
    sizes = {"fine": NUM_CLASSES, "coarse": len(COARSE_NAMES), "binary": 2}
    cms = {h: torch.zeros(sizes[h], sizes[h], dtype=torch.long, device=device) for h in heads}
    for images, masks in data.batches(pre, indices, cfg["micro_batch"], pin=device.type == "cuda"):
        x, y = data.to_device_batch(images, masks, device, channels_last=cfg["channels_last"])
        with autocast(cfg, device):
            outputs = model(x)
        targets = hierarchy_targets(y) if len(heads) > 1 else {"fine": y}
        outputs = outputs if isinstance(outputs, dict) else {"fine": outputs}
        for h in heads:
            cms[h] += confusion(outputs[h].argmax(1), targets[h], sizes[h])
    model.train()
    return {h: all_reduce(cm) for h, cm in cms.items()}


def evaluate_full_res(model, samples, rank, world, cfg, device):
    """Tiled prediction at each val image's own resolution; confusion matrix over every original pixel."""
    from predict import predict_image
    model.eval()
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for i in data.eval_shard(len(samples), rank, world).tolist():
        image = data.read_image(samples[i].image)
        mask = data.read_mask(samples[i].mask, image.shape[:2])
        pred = predict_image(model, image, tile=cfg["img_size"], device=device, precision=cfg["precision"])
        # read_mask's array is read-only; astype gives torch a writable copy in the dtype it needs anyway.
        cm += confusion(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)),
                        NUM_CLASSES)
    return {"fine": all_reduce(cm.to(device))}


def eval_metrics(cms):
    metrics = {}
    for head, cm in cms.items():
        report = iou_report(cm.cpu(), HEAD_CLASSES[head])
        prefix = "" if head == "fine" else f"{head}_"
        metrics.update({prefix + k: v for k, v in report.items()})
    return metrics


def save_checkpoint(path, state):
    """Temp file + rename, so a kill mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, encoder=None):
    if not Path(path).is_file():
        raise UserError(f"--checkpoint {path}: file not found; give a .pt written by train.py (e.g. runs/NAME/last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"--checkpoint {path}: not a readable checkpoint ({type(exc).__name__}); "
                        "use last.pt or best.pt of a run") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"--checkpoint {path}: not a train.py checkpoint (no model/config); use last.pt or best.pt")
    if encoder and ckpt["config"]["encoder"] != encoder:
        raise UserError(f"--checkpoint {path}: trained with --encoder {ckpt['config']['encoder']}, not {encoder}; "
                        f"pass --encoder {ckpt['config']['encoder']}")
    return ckpt


def resolve_class_weights(cfg, train_masks, save_dir=None):
    """Weights from the training split's preloaded masks (one bincount, so recomputing beats caching)."""
    if cfg["class_weights"] not in METHODS:
        return weights.resolve_class_weights(cfg["class_weights"], None)
    counts = weights.count_pixels(train_masks)
    class_weights = weights.compute_weights(counts, cfg["class_weights"], cfg["max_ratio"])
    if save_dir is not None:
        weights.save_weights(Path(save_dir) / "class_weights.json", cfg["class_weights"], counts, class_weights,
                             cfg["max_ratio"])
    return class_weights


def load_split(cfg, local_rank, local_world, train_needed=True):
    """Resolves the dataset, its split and the node-shared preloaded arrays (local rank 0 builds, others map)."""
    def resolve():
        root = data.resolve_data(cfg["data"], cfg["synthetic_count"], cfg["synthetic_size"])
        return root, *data.split_ids(root, cfg["split"], cfg["fold"], cfg["folds"], seed=cfg["seed"])

    # Local rank 0 generates the synthetic set and writes the split manifest before the others read them.
    if local_rank == 0:
        root, train_ids, val_ids = resolve()
    barrier()
    if local_rank != 0:
        root, train_ids, val_ids = resolve()
    by_id = {s.id: s for s in data.list_samples(root)}
    val_samples = [by_id[i] for i in val_ids]
    train_pre = None
    if train_needed:
        train_pre = data.preload([by_id[i] for i in train_ids], cfg["img_size"], local_rank, local_world,
                                 offline_aug=cfg["offline_aug"], mode="shm" if cfg["preload"] == "all" else "disk")
    val_pre = data.preload(val_samples, cfg["img_size"], local_rank, local_world,
                           mode="shm" if cfg["preload"] in ("all", "val") else "disk")
    return train_pre, val_pre, val_samples


def barrier():
    if dist.is_initialized():
        dist.barrier()


class Stop:
    """SIGTERM (SLURM pre-emption) asks for a checkpoint at the next agreed step, then a clean exit."""
    requested = False

    @classmethod
    def install(cls):
        signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "requested", True))

    @classmethod
    def agreed(cls, device):
        flag = torch.tensor(float(cls.requested), device=device)
        return bool(all_reduce(flag).item())


def log(rank, *parts):
    if rank == 0:
        print(*parts, flush=True)


def fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def train(cfg, rank, world, local_rank, local_world, device):
    run_dir = Path(cfg["run_dir"])
    torch.manual_seed(cfg["seed"])
    resume = None
    path = cfg["checkpoint"] or run_dir / "last.pt"
    if cfg["resume"] and not cfg["checkpoint"] and not path.is_file():
        # A job pre-empted before its first epoch ended is requeued with --resume too: it starts afresh.
        log(rank, f"--resume: no {path} yet; starting from scratch")
    elif cfg["resume"]:
        resume = load_checkpoint(path, cfg["encoder"])
        for key in ("decoder", "heads", "img_size", "batch_size", "epochs", "seed", "split", "fold"):
            if resume["config"][key] != cfg[key]:
                raise UserError(f"--resume: {path} was trained with --{key.replace('_', '-')} "
                                f"{resume['config'][key]}, not {cfg[key]}; use the same flags")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    train_pre, val_pre, _ = load_split(cfg, local_rank, local_world)
    n_train = len(train_pre.ids)
    if n_train < cfg["batch_size"]:
        raise UserError(f"--batch-size {cfg['batch_size']}: larger than the {n_train} training images; lower it")
    class_weights = resolve_class_weights(cfg, train_pre.masks, run_dir if rank == 0 else None)
    model, raw_model, optimizer = build_training(cfg, world, local_rank, device, cfg["pretrained"], cfg["weights"])
    steps_per_epoch = n_train // cfg["batch_size"]
    scheduler = get_lr_schedule(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")
    criterion = make_criterion(cfg, class_weights, device)
    start_epoch, start_step, best, carried_loss = 0, 0, -1.0, 0.0
    if resume:
        raw_model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, start_step, best = resume["epoch"], resume["step"], resume["best_miou"]
        carried_loss = resume.get("epoch_loss_sum", 0.0)
        if rank == 0 and (run_dir / "metrics.jsonl").is_file():
            # A kill between the metrics line and the checkpoint must not leave a duplicate epoch behind.
            lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["epoch"] <= start_epoch]
            (run_dir / "metrics.jsonl").write_text("".join(kept))
        log(rank, f"resumed {run_dir} at epoch {start_epoch + 1} step {start_step}")
    Stop.install()
    val_idx = data.eval_shard(len(val_pre.ids), rank, world)
    per_rank, micro_batch = cfg["per_rank_batch"], cfg["micro_batch"]
    log(rank, f"{cfg['encoder']}+{cfg['decoder']} on {device.type} x{world}: {n_train} train / {len(val_pre.ids)} "
              f"val images at {cfg['img_size']} px, batch {cfg['batch_size']} ({cfg['accum_steps']} micro-steps), "
              f"lr {cfg['lr']:.3g}, {cfg['precision']}, {steps_per_epoch} steps/epoch")

    def state(epoch, step, loss_sum=0.0):
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "step": step, "epoch_loss_sum": loss_sum, "best_miou": best, "config": cfg}

    run_start = time.time()
    for epoch in range(start_epoch, cfg["epochs"]):
        # Order and flips depend on (seed, epoch, sample) only, so any world size sees the same global batches
        # and a resumed run continues exactly where an uninterrupted one would be.
        generator = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
        order = torch.randperm(n_train, generator=generator)
        flips = torch.randint(0, 2, (n_train, 3), generator=generator).bool()
        step0 = start_step if epoch == start_epoch else 0
        mine = order[rank::world][step0 * per_rank: steps_per_epoch * per_rank]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loss_sum = torch.full((), carried_loss if epoch == start_epoch and rank == 0 else 0.0, device=device)
        skipped = 0
        first_bad = torch.tensor(-1, device=device)
        epoch_start = time.time()
        micro, step = [], step0
        for i, (images, masks) in enumerate(data.batches(train_pre, mine, micro_batch, pin=device.type == "cuda")):
            micro.append(data.to_device_batch(images, masks, device, flips[mine[i * micro_batch:(i + 1) * micro_batch]],
                                              channels_last=cfg["channels_last"]))
            if len(micro) < cfg["accum_steps"]:
                continue
            loss = train_step(model, criterion, optimizer, scheduler, scaler, micro, cfg, device)
            micro = []
            finite = torch.isfinite(loss)
            if cfg["skip_nonfinite"] and not finite:
                skipped += 1
                log(rank, f"  skipped a non-finite loss at epoch {epoch + 1} step {step + 1}")
            first_bad = torch.where(~finite & (first_bad < 0), step, first_bad)
            loss_sum += torch.where(finite, loss, 0.0)
            step += 1
            if step % cfg["log_every"] == 0 and step < steps_per_epoch:
                check_finite(first_bad, epoch, cfg, run_dir)
                done = step - step0
                rate = done * cfg["batch_size"] / (time.time() - epoch_start)
                log(rank, f"  epoch {epoch + 1} step {step}/{steps_per_epoch} loss {loss_sum.item() / step:.4f} "
                          f"{rate:.1f} img/s, epoch ETA {fmt_time((steps_per_epoch - step) * cfg['batch_size'] / rate)}")
            if Stop.requested if world == 1 else (step % 10 == 0 and Stop.agreed(device)):
                partial_loss = float(all_reduce(loss_sum.clone()))
                if rank == 0:
                    save_checkpoint(run_dir / "last.pt", state(epoch, step, partial_loss))
                log(rank, f"SIGTERM: saved {run_dir / 'last.pt'} at epoch {epoch + 1} step {step}; "
                          "rerun with --resume to continue")
                return None
        check_finite(first_bad, epoch, cfg, run_dir)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.time() - epoch_start
        train_loss = float(all_reduce(loss_sum.clone())) / world / max(steps_per_epoch, 1)
        metrics = eval_metrics(evaluate(raw_model, val_pre, val_idx, cfg, device))
        is_best = metrics["miou"] > best
        best = max(best, metrics["miou"])
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
        record = {"epoch": epoch + 1, "train_loss": train_loss, **metrics,
                  "img_s": (step - step0) * cfg["batch_size"] / train_time, "epoch_time_s": time.time() - epoch_start,
                  "peak_mem_mb": peak, "lr": scheduler.get_last_lr()[0], "best_miou": best, "skipped_steps": skipped}
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(run_dir / "last.pt", state(epoch + 1, 0))
            if is_best:
                save_checkpoint(run_dir / "best.pt", state(epoch + 1, 0))
            eta = (time.time() - run_start) / (epoch + 1 - start_epoch) * (cfg["epochs"] - epoch - 1)
            print(f"epoch {epoch + 1}/{cfg['epochs']} loss {train_loss:.4f} mIoU {metrics['miou']:.4f} "
                  f"damage IoU {metrics['binary_iou'] or 0:.4f} {record['img_s']:.1f} img/s "
                  f"{record['epoch_time_s']:.1f}s ETA {fmt_time(eta)}", flush=True)
    log(rank, f"best mIoU {best:.4f}; checkpoints in {run_dir}")
    return best


def check_finite(first_bad, epoch, cfg, run_dir):
    """Reads the device-side non-finite marker only at logging points, so the step itself never syncs."""
    if cfg["skip_nonfinite"]:
        return
    bad = int(all_reduce(first_bad.clone(), dist.ReduceOp.MAX).item())
    if bad >= 0:
        raise UserError(f"non-finite loss at epoch {epoch + 1} step {bad + 1}; last good checkpoint kept in "
                        f"{run_dir}; lower --lr, use --precision fp32, or pass --skip-nonfinite")


def _peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def eval_only(cfg, rank, world, local_rank, local_world, device):
    path = cfg["checkpoint"] or Path(cfg["run_dir"]) / "best.pt"
    ckpt = load_checkpoint(path)
    trained = ckpt["config"]
    # The split must be the one the model was trained on, or its validation images may have been trained on.
    for key in ("encoder", "decoder", "heads", "norm", "img_size", "split", "fold", "folds", "seed",
                "synthetic_count", "synthetic_size"):
        cfg[key] = trained[key]
    cfg["data"] = cfg["data_flag"] or trained["data"]
    model = build_model(trained["encoder"], trained["num_classes"], trained["decoder"], trained["heads"], False,
                        trained["img_size"], trained["norm"]).to(device)
    model.load_state_dict(ckpt["model"])
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    _, val_pre, val_samples = load_split(cfg, local_rank, local_world, train_needed=False)
    if cfg["full_res"]:
        cms = evaluate_full_res(model, val_samples, rank, world, cfg, device)
    else:
        cms = evaluate(model, val_pre, data.eval_shard(len(val_pre.ids), rank, world), cfg, device)
    metrics = eval_metrics(cms)
    if rank == 0:
        print(json.dumps({"checkpoint": str(path), "full_res": cfg["full_res"], **metrics}, indent=1), flush=True)
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


def build_training(cfg, world, local_rank, device, pretrained=False, encoder_weights=None):
    """Model (channels_last, SyncBN on multi-GPU, compiled, DDP-wrapped), its raw module and AdamW."""
    model = build_model(cfg["encoder"], NUM_CLASSES, cfg["decoder"], cfg["heads"], pretrained,
                        cfg["img_size"], cfg["norm"], encoder_weights).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  fused=device.type == "cuda")
    return model, raw_model, optimizer


def find_batch_size(cfg, world, device):
    """Largest per-rank batch whose training step fits in GPU memory (doubling, then bisection)."""
    if device.type != "cuda":
        return default_batch(cfg["encoder"])
    probe = dict(cfg, compile=False, accum_steps=1, skip_nonfinite=False, clip=None)
    model, raw_model, optimizer = build_training(probe, 1, 0, device)
    scheduler = get_lr_schedule(optimizer, dict(probe, epochs=1), 10**6)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")
    criterion = make_criterion(probe, None, device)

    def fits(batch):
        try:
            x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], device=device)
            y = torch.randint(0, NUM_CLASSES, (batch, cfg["img_size"], cfg["img_size"]), device=device)
            train_step(model, criterion, optimizer, scheduler, scaler, [(x, y)], probe, device)
            torch.cuda.synchronize(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    low, high = 0, 1
    while high <= 4096 and fits(high):
        low, high = high, high * 2
    while high - low > max(1, low // 16):
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    if low == 0:
        raise UserError(f"--batch-size auto: not even one {cfg['img_size']} px image fits; lower --img-size")
    # Headroom for fragmentation and the evaluation pass.
    return max(1, int(low * 0.9)) * world


def bench(cfg, rank, world, local_rank, local_world, device):
    """Times the real train_step and inference after warm-up; one JSON line with throughput, memory, FLOPs, MFU."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg["data"] = "synthetic"
    train_pre, _, _ = load_split(cfg, local_rank, local_world)
    model, raw_model, optimizer = build_training(cfg, world, local_rank, device)
    steps, warmup = cfg["bench_steps"], max(2, cfg["bench_steps"] // 4)
    scheduler = get_lr_schedule(optimizer, dict(cfg, epochs=1), 2 * (steps + warmup) + 1)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")
    criterion = make_criterion(cfg, np.ones(NUM_CLASSES), device)
    n, per_rank = len(train_pre.ids), cfg["per_rank_batch"]
    generator = torch.Generator().manual_seed(cfg["seed"])
    flips = torch.randint(0, 2, (n, 3), generator=generator).bool()
    index = torch.arange(per_rank) % n
    micro = [data.to_device_batch(images, masks, device, flips[index[:len(images)]],
                                 channels_last=cfg["channels_last"])
             for images, masks in data.batches(train_pre, index, cfg["micro_batch"], pin=device.type == "cuda")]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn):
        for _ in range(warmup):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s = timed(lambda: train_step(model, criterion, optimizer, scheduler, scaler, micro, cfg, device))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    raw_model.eval()
    x = micro[0][0]
    with torch.no_grad():
        def infer():
            with autocast(cfg, device):
                raw_model(x)
        infer_s = timed(infer)
        flops = FlopCounterMode(display=False)
        with flops:
            raw_model(x[:1])
    loader_order = torch.randperm(n, generator=generator).repeat(max(1, 512 // n))
    start, loaded = time.perf_counter(), 0
    for images, masks in data.batches(train_pre, loader_order, per_rank, pin=device.type == "cuda"):
        data.to_device_batch(images, masks, device, flips[:len(images)], channels_last=cfg["channels_last"])
        loaded += len(images)
    sync()
    loader_img_s = loaded / (time.perf_counter() - start)
    train_img_s = steps * cfg["batch_size"] / train_s
    gflops = flops.get_total_flops() / 1e9
    peak_tflops = cfg["peak_tflops"] or _peak_tflops(device, cfg["precision"])
    result = {"encoder": cfg["encoder"], "decoder": cfg["decoder"], "heads": cfg["heads"],
              "img_size": cfg["img_size"], "batch": cfg["batch_size"], "world": world,
              "precision": cfg["precision"], "channels_last": cfg["channels_last"], "compile": cfg["compile"],
              "clip": cfg["clip"], "train_img_s": train_img_s, "infer_img_s": steps * len(x) * world / infer_s,
              "peak_mem_mb": peak, "params_m": sum(p.numel() for p in raw_model.parameters()) / 1e6,
              "gflops": gflops, "loader_img_s": loader_img_s,
              # Training costs ~3x the forward FLOPs (forward + two backward matmuls per forward one).
              "mfu": 3 * gflops * 1e9 * train_img_s / (peak_tflops * 1e12 * world) if peak_tflops else None,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if rank == 0:
        print(json.dumps(result), flush=True)
        if cfg["bench_out"]:
            with open(cfg["bench_out"], "a") as f:
                f.write(json.dumps(result) + "\n")
    return result


def _peak_tflops(device, precision):
    """Dense tensor-core peak of known cards (vendor datasheets); None means MFU is not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}
    for key, bf16 in table.items():
        if key in name:
            return bf16 if precision in ("bf16", "fp16") else bf16 / 2
    return None


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        if args.summary:
            summary(args.summary)
            return 0
        if args.dry_run:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
            cfg = resolve_config(args, world, device)
            print(json.dumps(cfg, indent=2))
            return 0
        rank, world, local_rank, local_world, device = setup_distributed(args.dist_timeout)
        cfg = resolve_config(args, world, device)
        if args.batch_size == "auto" and device.type == "cuda":
            found = torch.tensor(find_batch_size(cfg, world, device), device=device)
            args.batch_size = str(int(all_reduce(found, dist.ReduceOp.MIN)))
            torch.cuda.empty_cache()
            cfg = resolve_config(args, world, device)
            log(rank, f"--batch-size auto: {cfg['batch_size']} fits (lr {cfg['lr']:.3g})")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if args.bench:
            bench(cfg, rank, world, local_rank, local_world, device)
        elif args.eval_only:
            eval_only(cfg, rank, world, local_rank, local_world, device)
        else:
            train(cfg, rank, world, local_rank, local_world, device)
        return 0
    except UserError as exc:
        print(f"error: {exc}" if rank == 0 else f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: out of device memory at --batch-size {args.batch_size or 'default'}; lower --batch-size, "
              "pass --micro-batch to accumulate, or use --batch-size auto (finished epochs are in last.pt)",
              file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
