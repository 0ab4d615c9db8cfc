"""One optimisation step and what it is made of: the network on its device (channels_last, SyncBatchNorm on
several GPUs), the Training parts (DDP, --compile, AdamW, OneCycle, the GradScaler, the loss, the EMA) and
train_step over a global batch's micro-batches, whose loss is the whole batch's however it is split.

train.py runs these steps epoch by epoch; bench.py, profile_step.py and the --batch-size auto probe time them.
"""
import collections
import contextlib
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

import data
from losses import HierarchicalLoss, build_loss, global_loss, sum_over_ranks
from model import autocast, build_model, sync_batchnorm
from optim import build_optimizer, new_ema, one_cycle, update_ema

# What one optimisation run consists of; built once by build_training and passed around whole. world is the
# number of ranks whose loss sums a step adds up (1 for a local probe, whatever the process group); ema is the
# weight average (optim.EMA) or None.
Training = collections.namedtuple("Training", "model raw_model optimizer scheduler scaler criterion world ema")


def make_criterion(cfg, class_weights, device):
    """The loss module (sums form, see losses.global_loss) over the run's label scheme, on the device."""
    weight = torch.as_tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    scheme = data.run_scheme(cfg)
    if cfg["heads"] == "hierarchical":
        return HierarchicalLoss(cfg["loss"], scheme, weight, head_weights=tuple(cfg["head_weights"])).to(device)
    return build_loss(cfg["loss"], weight, scheme.ignore)


def build_network(cfg, device, world, pretrained=False, encoder_weights=None):
    """The network on the device (channels_last unless --no-channels-last). On several GPUs its BatchNorms
    become SyncBatchNorm the timm way, which keeps timm's fused norm + activation layers (MaxViT, CoAtNet)
    computing the same function; the state dict is unchanged, so a checkpoint loads into the plain model."""
    groups = data.run_scheme(cfg).groups
    model = build_model(cfg["encoder"], cfg["num_classes"], cfg["decoder"], cfg["heads"], pretrained,
                        cfg["img_size"], cfg["norm"], encoder_weights, len(groups) if groups else None,
                        cfg["drop_path"]).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda":
        model = sync_batchnorm(model)
    return model


def build_training(cfg, raw_model, world, device, steps_per_epoch, class_weights=None):
    """The network DDP-wrapped (world > 1), then compiled (--compile), AdamW over the parameter groups,
    OneCycle, the GradScaler (active for fp16 only), the loss and the weight EMA (--ema; copied from the
    network before any wrapping). Compiling the DDP module, not wrapping a compiled one, lets DDPOptimizer cut
    the graph at the gradient buckets, so their all-reduce overlaps the backward."""
    ema = new_ema(raw_model, cfg, cfg["epochs"] * steps_per_epoch)
    model = raw_model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)
    optimizer = build_optimizer(raw_model, cfg, device)
    return Training(model, raw_model, optimizer, one_cycle(optimizer, cfg, steps_per_epoch),
                    torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16"),
                    make_criterion(cfg, class_weights, device), world, ema)


def evaluated(parts):
    """The network that is evaluated, selected, tested and predicted with: the EMA's when there is one."""
    return parts.raw_model if parts.ema is None else parts.ema.model


def batch_totals(parts, micro_batches, cfg, device):
    """Loss sums of the whole global batch (every micro-batch, every rank), before any backward: the labels
    alone give them for a linear loss; otherwise a forward without gradients, after which BatchNorm
    statistics and the random state are put back, so the real forward of each micro-batch is unchanged."""
    criterion = parts.criterion
    if criterion.linear:
        sums = [criterion.label_sums(y) for _, y in micro_batches]
    else:
        buffers = [b.clone() for b in parts.raw_model.buffers()]
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        with torch.no_grad():
            sums = []
            for x, y in micro_batches:
                with autocast(cfg["precision"], device):
                    outputs = parts.model(x)
                sums.append(criterion.sums(outputs, y))
        for buffer, saved in zip(parts.raw_model.buffers(), buffers):
            buffer.copy_(saved)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
    return sum_over_ranks({k: sum(s[k] for s in sums) for k in sums[0]}, reduce=parts.world > 1)


def accumulate_gradients(parts, micro_batches, cfg, device):
    """Forward and backward of every micro-batch; returns the loss of the whole global batch (a device
    tensor). DDP syncs gradients only on the last micro-step.

    The loss is that of the whole global batch (losses.global_loss), so its value and gradients do not
    depend on how the batch is split across ranks or micro-batches (without BatchNorm, or with SyncBatchNorm
    across ranks: a micro-batch's BatchNorm still sees its own statistics).
    """
    model, scaler, criterion, world = parts.model, parts.scaler, parts.criterion, parts.world
    totals = batch_totals(parts, micro_batches, cfg, device) if len(micro_batches) > 1 else None
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(cfg["precision"], device):
                outputs = model(x)
            local = criterion.sums(outputs, y)
            loss = global_loss(criterion, local, sum_over_ranks(local, reduce=world > 1) if totals is None else totals)
            # DDP averages the ranks' gradients; the global loss wants their sum.
            scaler.scale(loss * world).backward()
        loss_sum += loss.detach()
    # Each micro-step's loss is the global value, except a linear loss's, whose parts add up over the batch.
    if totals is not None and criterion.linear:
        return sum_over_ranks({"loss": loss_sum}, reduce=world > 1)["loss"]
    return loss.detach()


def advance(scheduler):
    """One schedule step per training step, taken or skipped: the LR follows the step count, so a resumed run
    matches. torch warns when the first step's optimizer step was skipped (a non-finite loss, or fp16's scaler
    skipping an overflow) as if the schedule were called out of order; here it is not, so that warning alone is
    silenced. torch checks on the schedule's first step only (last_epoch 0), and only that one is wrapped:
    leaving catch_warnings resets Python's memory of warnings already shown, so wrapping every step would print
    any other repeating warning once per step instead of once."""
    if scheduler.last_epoch > 0:
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()


def train_step(parts, micro_batches, cfg, device):
    """One optimizer step over the micro-batches (accumulate_gradients, then AdamW, the EMA and the schedule).
    Returns the global batch's loss as a device tensor: reading it is left to the logging points, so the step
    never syncs unless --skip-nonfinite asks to check every step (all ranks must agree on skipping)."""
    optimizer, scheduler, scaler = parts.optimizer, parts.scheduler, parts.scaler
    loss_sum = accumulate_gradients(parts, micro_batches, cfg, device)
    if cfg["skip_nonfinite"] and not torch.isfinite(loss_sum):
        optimizer.zero_grad(set_to_none=True)
        advance(scheduler)
        return loss_sum
    if cfg["clip"]:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parts.raw_model.parameters(), cfg["clip"])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        update_ema(parts.ema, parts.raw_model)
    advance(scheduler)
    return loss_sum
