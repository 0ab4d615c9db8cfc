"""Train and evaluate a damage-segmentation model: DDP (torchrun or srun), AMP, dataset-level mIoU, resume.

    torchrun --nproc_per_node=2 train.py --encoder mit_b3 --data data/artefact --pretrained
    python train.py --eval-only --checkpoint runs/NAME/best.pt [--full-res]
    python train.py --summary runs/cv-mit_b3/fold*

`main` orchestrates; `train_one_epoch` runs one epoch of `train_step`s; `evaluate` scores a split.
"""
import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from checkpoint import load_resumable, restore_training, save_checkpoint, training_state
from files import atomic_write, remove_stale_temporaries
from distributed import Preemption, all_reduce, broadcast_buffers, setup_distributed
from labels import NUM_CLASSES, UserError, run_cli
from evaluation import eval_only, evaluate
from losses import HierarchicalLoss, build_loss
from metrics import eval_metrics, summary
from model import ENCODERS, autocast, build_model, check_img_size, default_batch
from weights import METHODS, resolve_class_weights

BASE_BATCH = 96
# What one optimisation run consists of; built once by build_training and passed around whole.
Training = collections.namedtuple("Training", "model raw_model optimizer scheduler scaler criterion")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    p.add_argument("--run-dir", default=None, help="default runs/<encoder>-<decoder>-<split><fold>")
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
    p.add_argument("--max-skipped", type=int, default=20,
                   help="with --skip-nonfinite: stop after this many consecutive skipped steps")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--summary", nargs="+", default=None, metavar="RUN_DIR", help="mean ± std over finished folds")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _batch_sizes(args, world_size):
    """(global batch, per-rank batch, micro-batch) from --batch-size and --micro-batch."""
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
    return batch, per_rank, micro


def _check_numbers(args):
    """Every numeric flag in its range, or one line naming the flag and what it takes."""
    def finite(x):
        return x is not None and math.isfinite(x)

    checks = [("--lr", args.lr, finite(args.lr) and args.lr > 0, "a positive number, e.g. 1e-3"),
              ("--weight-decay", args.weight_decay, finite(args.weight_decay) and args.weight_decay >= 0,
               "0 or more, e.g. 0.01"),
              ("--pct-start", args.pct_start, finite(args.pct_start) and 0 < args.pct_start < 1,
               "between 0 and 1, e.g. 0.3"),
              ("--clip", args.clip, args.clip is None or (finite(args.clip) and args.clip > 0),
               "a positive gradient max-norm, e.g. 1.0 (leave it out for no clipping)"),
              ("--max-ratio", args.max_ratio, args.max_ratio >= 1, "at least 1 (inf for no cap)"),
              ("--epochs", args.epochs, args.epochs >= 1, "at least 1"),
              ("--log-every", args.log_every, args.log_every >= 1, "at least 1 (steps)"),
              ("--seed", args.seed, 0 <= args.seed < 2**32, "between 0 and 2**32 - 1"),
              ("--synthetic-count", args.synthetic_count, args.synthetic_count >= 2, "at least 2 (images)"),
              ("--synthetic-size", args.synthetic_size, args.synthetic_size >= 32, "at least 32 (px)"),
              ("--micro-batch", args.micro_batch, args.micro_batch is None or args.micro_batch >= 1, "at least 1"),
              ("--dist-timeout", args.dist_timeout, args.dist_timeout >= 1, "at least 1 (seconds)"),
              ("--max-skipped", args.max_skipped, args.max_skipped >= 1, "at least 1 (steps)"),
              ("--folds", args.folds, args.folds >= 2, "at least 2"),
              ("--fold", args.fold, args.fold >= 0, "0 or more")]
    for flag, value, ok, need in checks:
        if not ok:
            raise UserError(f"{flag} {value}: must be {need}")
    if args.run_dir and Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise UserError(f"--run-dir {args.run_dir}: is a file; pass a folder for the run's checkpoints and logs")


def resolve_config(args, world_size, device):
    """Checks flags that need no data and derives batch, LR and precision; raises UserError naming the flag."""
    _check_numbers(args)
    cfg = vars(args).copy()
    cfg.update(data=args.data or "synthetic", data_flag=args.data)
    if args.data not in (None, "synthetic") and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: folder not found; run `python prepare.py ingest` or use --data synthetic")
    if args.encoder not in ENCODERS and not _timm_knows(args.encoder):
        raise UserError(f"--encoder {args.encoder}: unknown; use one of {', '.join(ENCODERS)} or a timm model name")
    check_img_size(args.encoder, args.img_size)
    try:
        cfg["head_weights"] = [float(w) for w in args.head_weights.split(",")]
    except ValueError:
        cfg["head_weights"] = []
    if len(cfg["head_weights"]) != 3:
        raise UserError(f"--head-weights {args.head_weights}: give three numbers binary,coarse,fine e.g. 0.2,0.3,0.5")
    batch, per_rank, micro = _batch_sizes(args, world_size)
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


def get_lr_schedule(optimizer, cfg, steps_per_epoch):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch,
                                               pct_start=cfg["pct_start"], anneal_strategy="cos")


def make_criterion(cfg, class_weights, device):
    weight = torch.as_tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    if cfg["heads"] == "hierarchical":
        return HierarchicalLoss(cfg["loss"], weight, head_weights=tuple(cfg["head_weights"]))
    loss = build_loss(cfg["loss"], weight)

    def criterion(outputs, target):
        return loss(outputs.float(), target)
    return criterion


def build_training(cfg, world, local_rank, device, steps_per_epoch, class_weights=None, pretrained=False,
                   encoder_weights=None):
    """Model (channels_last, SyncBN on multi-GPU, compiled, DDP-wrapped), its raw module, AdamW, OneCycle,
    the GradScaler (active for fp16 only) and the loss."""
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
    return Training(model, raw_model, optimizer, get_lr_schedule(optimizer, cfg, steps_per_epoch),
                    torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16"),
                    make_criterion(cfg, class_weights, device))


def train_step(parts, micro_batches, cfg, device):
    """One optimizer step over the micro-batches; DDP syncs gradients only on the last micro-step.

    Returns the loss as a device tensor: reading it is left to the logging points, so the step never syncs
    unless --skip-nonfinite asks to check every step (all ranks must agree on skipping).
    """
    model, _, optimizer, scheduler, scaler, criterion = parts
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(cfg["precision"], device):
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


def epoch_order(cfg, epoch, n):
    """Sample order and flips of an epoch, from (seed, epoch) only: every world size sees the same global
    batches, and a resumed run continues exactly where an uninterrupted one would be."""
    generator = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
    order = torch.randperm(n, generator=generator)
    return order, torch.randint(0, 2, (n, 3), generator=generator).bool()


def train_one_epoch(parts, pre, epoch, step0, carried_loss, cfg, rank, world, device, preemption, skips):
    """Steps step0.. of one epoch; returns its loss sum (device tensor), the steps done, skipped steps and
    whether a pre-emption stopped it early. Non-finite losses raise at the logging points; with
    --skip-nonfinite, more than --max-skipped consecutive skips (counted in skips across epochs) raise."""
    steps_per_epoch = len(pre) // cfg["batch_size"]
    per_rank, micro_batch = cfg["per_rank_batch"], cfg["micro_batch"]
    order, flips = epoch_order(cfg, epoch, len(pre))
    mine = order[rank::world][step0 * per_rank: steps_per_epoch * per_rank]
    loss_sum = torch.full((), carried_loss if rank == 0 else 0.0, device=device)
    first_bad = torch.tensor(-1, device=device)
    skipped, step, micro, start = 0, step0, [], time.time()
    for i, (images, masks) in enumerate(data.batches(pre, mine, micro_batch, pin=device.type == "cuda")):
        micro.append(data.to_device_batch(images, masks, device, flips[mine[i * micro_batch:(i + 1) * micro_batch]],
                                          channels_last=cfg["channels_last"]))
        if len(micro) < cfg["accum_steps"]:
            continue
        loss = train_step(parts, micro, cfg, device)
        micro = []
        finite = torch.isfinite(loss)
        if cfg["skip_nonfinite"]:
            # train_step skipped on the loss summed over ranks; every rank must count the same skips.
            finite = torch.isfinite(all_reduce(loss.clone()))
            skips["consecutive"] = 0 if finite else skips["consecutive"] + 1
            if not finite:
                skipped += 1
                log(rank, f"  skipped a non-finite loss at epoch {epoch + 1} step {step + 1}")
            if skips["consecutive"] > cfg["max_skipped"]:
                raise UserError(f"--skip-nonfinite: {skips['consecutive']} consecutive steps had a non-finite loss "
                                f"(epoch {epoch + 1} step {step + 1}, --max-skipped {cfg['max_skipped']}); "
                                "lower --lr or use --precision fp32")
        first_bad = torch.where(~finite & (first_bad < 0), step, first_bad)
        loss_sum += torch.where(finite, loss, 0.0)
        step += 1
        if step % cfg["log_every"] == 0 and step < steps_per_epoch:
            check_finite(first_bad, epoch, cfg)
            rate = (step - step0) * cfg["batch_size"] / (time.time() - start)
            log(rank, f"  epoch {epoch + 1} step {step}/{steps_per_epoch} loss {loss_sum.item() / step:.4f} "
                      f"{rate:.1f} img/s, epoch ETA {fmt_time((steps_per_epoch - step) * cfg['batch_size'] / rate)}")
        if preemption.poll():
            return loss_sum, step, skipped, True
    check_finite(first_bad, epoch, cfg)
    return loss_sum, step, skipped, False


def check_finite(first_bad, epoch, cfg):
    """Reads the device-side non-finite marker only at logging points, so the step itself never syncs."""
    if cfg["skip_nonfinite"]:
        return
    bad = int(all_reduce(first_bad.clone(), dist.ReduceOp.MAX).item())
    if bad >= 0:
        kept = (f"last good checkpoint kept in {cfg['run_dir']}" if (Path(cfg["run_dir"]) / "last.pt").is_file()
                else "no checkpoint was written yet")
        raise UserError(f"non-finite loss at epoch {epoch + 1} step {bad + 1}; {kept}; lower --lr, use "
                        "--precision fp32, or pass --skip-nonfinite")


def load_resume(cfg, run_dir, rank):
    """The checkpoint to resume from, or None to start afresh."""
    path = Path(cfg["checkpoint"] or run_dir / "last.pt")
    if not cfg["resume"]:
        return None
    if not cfg["checkpoint"] and not path.is_file():
        # A job pre-empted before its first epoch ended is requeued with --resume too: it starts afresh.
        log(rank, f"--resume: no {path} yet; starting from scratch")
        return None
    return load_resumable(path, cfg)


def restore(parts, resume, run_dir, rank):
    """Loads the resumed states; drops metrics lines of epochs the checkpoint does not hold."""
    progress = restore_training(parts, resume)
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0 and metrics_path.is_file():
        # A kill between the metrics line and the checkpoint must not leave a duplicate epoch behind.
        lines = metrics_path.read_text().splitlines(keepends=True)
        metrics_path.write_text("".join(line for line in lines if json.loads(line)["epoch"] <= resume["epoch"]))
    log(rank, f"resumed {run_dir} at epoch {resume['epoch'] + 1} step {resume['step']}")
    return progress


def prepare_run_dir(cfg, run_dir, resume, rank):
    """Never overwrites an earlier run's checkpoints; a fresh start begins a fresh metrics.jsonl."""
    earlier = [name for name in ("last.pt", "best.pt") if (run_dir / name).is_file()]
    if earlier and not cfg["resume"]:
        raise UserError(f"--run-dir {run_dir}: holds {' and '.join(earlier)} of an earlier run; pass --resume to "
                        "continue it, or a fresh --run-dir to start another")
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--run-dir {run_dir}: cannot create it ({exc.strerror}); pass a writable folder") from None
        remove_stale_temporaries(run_dir)
        if resume is None:
            (run_dir / "metrics.jsonl").write_text("")
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def stop_for_preemption(parts, cfg, run_dir, epoch, step, best, loss_sum, rank):
    """Rank 0 writes last.pt where the pre-emption hit; --resume continues from there."""
    partial_loss = float(all_reduce(loss_sum.clone()))
    if rank == 0:
        save_checkpoint(run_dir / "last.pt", training_state(parts, cfg, epoch, step, best, partial_loss))
    log(rank, f"SIGTERM: saved {run_dir / 'last.pt'} at epoch {epoch + 1} step {step}; "
              "rerun with --resume to continue")


def train(cfg, rank, world, local_rank, local_world, device):
    run_dir = Path(cfg["run_dir"])
    torch.manual_seed(cfg["seed"])
    resume = load_resume(cfg, run_dir, rank)
    prepare_run_dir(cfg, run_dir, resume, rank)
    train_pre, val_pre, _ = data.load_split(cfg, local_rank, local_world)
    if len(train_pre) < cfg["batch_size"]:
        raise UserError(f"--batch-size {cfg['batch_size']}: larger than the {len(train_pre)} training images; "
                        "lower it")
    class_weights = resolve_class_weights(cfg["class_weights"], train_pre.masks, cfg["max_ratio"],
                                          run_dir / "class_weights.json" if rank == 0 else None)
    steps_per_epoch = len(train_pre) // cfg["batch_size"]
    parts = build_training(cfg, world, local_rank, device, steps_per_epoch, class_weights, cfg["pretrained"],
                           cfg["weights"])
    start_epoch, start_step, best, carried_loss = restore(parts, resume, run_dir, rank) if resume else (0, 0, -1.0, 0.0)
    val_idx = data.eval_shard(len(val_pre), rank, world)
    log(rank, f"{cfg['encoder']}+{cfg['decoder']} on {device.type} x{world}: {len(train_pre)} train / {len(val_pre)} "
              f"val images at {cfg['img_size']} px, batch {cfg['batch_size']} ({cfg['accum_steps']} micro-steps), "
              f"lr {cfg['lr']:.3g}, {cfg['precision']}, {steps_per_epoch} steps/epoch")
    preemption, skips = Preemption(), {"consecutive": 0}
    run_start = time.time()
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            step0 = start_step if epoch == start_epoch else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            epoch_start = time.time()
            loss_sum, step, skipped, preempted = train_one_epoch(
                parts, train_pre, epoch, step0, carried_loss if epoch == start_epoch else 0.0, cfg, rank, world,
                device, preemption, skips)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time = time.time() - epoch_start
            broadcast_buffers(parts.raw_model)
            cms = None if preempted else evaluate(parts.raw_model, val_pre, val_idx, cfg, device, preemption)
            if cms is None:
                stop_for_preemption(parts, cfg, run_dir, epoch, step, best, loss_sum, rank)
                return None
            metrics = eval_metrics(cms)
            is_best, best = metrics["miou"] > best, max(best, metrics["miou"])
            record = {"epoch": epoch + 1,
                      "train_loss": float(all_reduce(loss_sum.clone())) / world / max(steps_per_epoch, 1), **metrics,
                      "img_s": (step - step0) * cfg["batch_size"] / train_time,
                      "epoch_time_s": time.time() - epoch_start, "peak_mem_mb": peak_memory_mb(device),
                      "lr": parts.scheduler.get_last_lr()[0], "best_miou": best, "skipped_steps": skipped}
            if rank == 0:
                end_of_epoch(parts, cfg, record, cms if is_best else None, run_dir,
                             (time.time() - run_start) / (epoch + 1 - start_epoch) * (cfg["epochs"] - epoch - 1))
    finally:
        preemption.close()
    log(rank, f"best mIoU {best:.4f}; checkpoints in {run_dir}")
    return best


def end_of_epoch(parts, cfg, record, best_cms, run_dir, eta):
    """Rank 0: the metrics line, last.pt, and for a new best epoch best.pt and its confusion matrices
    (confusion.json, rows truth, columns prediction), so tables and pictures can be redrawn without a GPU."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    state = training_state(parts, cfg, record["epoch"], 0, record["best_miou"])
    save_checkpoint(run_dir / "last.pt", state)
    if best_cms is not None:
        save_checkpoint(run_dir / "best.pt", state)
        confusion = {"split": "val", "epoch": record["epoch"], **{h: cm.tolist() for h, cm in best_cms.items()}}
        atomic_write(run_dir / "confusion.json", lambda tmp: tmp.write_text(json.dumps(confusion)))
    print(f"epoch {record['epoch']}/{cfg['epochs']} loss {record['train_loss']:.4f} mIoU {record['miou']:.4f} "
          f"damage IoU {record['binary_iou'] or 0:.4f} {record['img_s']:.1f} img/s "
          f"{record['epoch_time_s']:.1f}s ETA {fmt_time(eta)}", flush=True)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(rank, *parts):
    if rank == 0:
        print(*parts, flush=True)


def fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def find_batch_size(cfg, world, device):
    """Largest per-rank batch whose training step fits in GPU memory (doubling, then bisection)."""
    if device.type != "cuda":
        return default_batch(cfg["encoder"])
    probe = dict(cfg, compile=False, accum_steps=1, skip_nonfinite=False, clip=None, epochs=1)
    parts = build_training(probe, 1, 0, device, 10**6)

    def fits(batch):
        try:
            x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], device=device)
            y = torch.randint(0, NUM_CLASSES, (batch, cfg["img_size"], cfg["img_size"]), device=device)
            train_step(parts, [(x, y)], probe, device)
            torch.cuda.synchronize(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            parts.optimizer.zero_grad(set_to_none=True)
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


def setup(args):
    """(cfg, rank, world, local_rank, local_world, device) with the process group up and --batch-size resolved."""
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
    return cfg, rank, world, local_rank, local_world, device


def run_main(args, job):
    """Runs job(cfg, rank, world, local_rank, local_world, device); a user error ends in one line, exit 2."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        cfg, rank, world, local_rank, local_world, device = setup(args)
        job(cfg, rank, world, local_rank, local_world, device)
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


def dry_run(args):
    """Prints the config a run with these flags would use, without data or process group."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    print(json.dumps(resolve_config(args, world, device), indent=2))


def main(argv=None):
    args = parse_args(argv)
    if args.summary:
        return run_cli(summary, args.summary)
    if args.dry_run:
        return run_cli(dry_run, args)
    return run_main(args, eval_only if args.eval_only else train)


if __name__ == "__main__":
    sys.exit(main())
