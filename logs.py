"""What a training run prints: the header (sizes, parameters, forward GFLOPs, parameter groups, EMA), the step
line inside an epoch and the epoch line; every line rank 0's, plain text that reads well in a SLURM log."""
import datetime
import time

import torch

from config import lr_line


def fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def timestamp():
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def peak_memory_mb(device):
    """Peak device memory of this process since the epoch began (CUDA), or its peak resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def forward_gflops(model, img_size, device, channels_last=True):
    """GFLOPs of one forward pass of one img_size crop (torch's FlopCounterMode; a training step costs about
    3x), counted once in eval mode, which changes no BatchNorm statistic and draws no random number."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def header_lines(cfg, parts, sizes, device, world):
    """The run's opening lines: what trains on what, its batch and LR, parameters and forward GFLOPs, one line
    per parameter group when there are several, and the EMA's half-life."""
    n_train, n_val, n_test = sizes
    steps = n_train // cfg["batch_size"]
    params = sum(p.numel() for p in parts.raw_model.parameters())
    gflops = forward_gflops(parts.raw_model, cfg["img_size"], device, cfg["channels_last"])
    decay = " (none on norms, biases, positions)" if cfg["no_decay_norms"] else ""
    lines = [f"{cfg['encoder']}+{cfg['decoder']} on {device.type} x{world}: {n_train} train / {n_val} inner val / "
             f"{n_test} test images at {cfg['img_size']} px, batch {cfg['batch_size']} ({cfg['accum_steps']} "
             f"micro-steps), {lr_line(cfg)[0]}, {cfg['precision']}, {steps} steps/epoch, select {cfg['select']}"
             + (f", test fold {cfg['held_out']}" if cfg.get("held_out") else ""),
             f"{params / 1e6:.2f} M parameters, {gflops:.2f} GFLOPs per {cfg['img_size']} px crop forward, "
             f"weight decay {cfg['weight_decay']:g}{decay}, "
             f"drop-path {cfg['drop_path']:g}, eval TTA {cfg['eval_tta']}"]
    groups = parts.optimizer.param_groups
    if len(groups) > 1:
        lines += [f"  group {g['name']}: peak lr {g['max_lr']:.2e} (x{g['lr_scale']:g}), weight decay "
                  f"{g['weight_decay']:g}, {sum(p.numel() for p in g['params']):,} parameters"
                  for g in groups]
    if parts.ema is not None:
        half_life = cfg["ema_half_life"] * cfg["epochs"] * steps
        lines.append(f"weight EMA: half-life {half_life:.0f} steps ({cfg['ema_half_life']:g} of "
                     f"{cfg['epochs'] * steps}), decay {parts.ema.decay:.6f} per step; the average is evaluated, "
                     "selected and tested")
    return lines


def schedule_lr(optimizer):
    """The schedule's LR at scale 1 (a group's LR over its lr_scale): one number whatever the groups."""
    group = optimizer.param_groups[0]
    return group["lr"] / group["lr_scale"]


def progress_line(run, parts, epoch, step, loss_sum, timing):
    """Rank 0's line inside an epoch: time of day, loss so far, the current LR of each distinct group, img/s,
    data-path vs step milliseconds per step and peak memory, both since the previous line, and the epoch's
    ETA (timing["epoch_steps"] steps in all). Reading the loss is its only sync, so the time between two lines
    is exact; on a GPU the data/step split is host time (a step's kernels may still run while the next batch is
    gathered)."""
    cfg, steps_per_epoch = run.cfg, timing["epoch_steps"]
    now = time.time()
    steps = max(timing["steps"], 1)
    rate = steps * cfg["batch_size"] / max(now - timing["logged"], 1e-9)
    lrs = "/".join(dict.fromkeys(f"{g['lr']:.2e}" for g in parts.optimizer.param_groups))
    print(f"  [{timestamp()}] epoch {epoch + 1} step {step}/{steps_per_epoch} loss {loss_sum.item() / step:.4f} "
          f"lr {lrs} {rate:.1f} img/s data {1000 * timing['data'] / steps:.0f} ms/step step "
          f"{1000 * timing['step'] / steps:.0f} ms/step peak {peak_memory_mb(run.device):.0f} MB epoch ETA "
          f"{fmt_time((steps_per_epoch - step) * cfg['batch_size'] / rate)}", flush=True)
    timing.update(data=0.0, step=0.0, steps=0, logged=now)


def epoch_line(cfg, record, eta):
    scores = ""
    if "val" in record:
        scores = f" val mIoU {record['val']['miou']:.4f} damage IoU {record['val'].get('binary_iou') or 0:.4f}"
    return (f"[{timestamp()}] epoch {record['epoch']}/{cfg['epochs']} loss {record['train_loss']:.4f}{scores} lr "
            f"{record['lr']:.2e} {record['img_s']:.1f} img/s {record['epoch_time_s']:.1f}s peak "
            f"{record['peak_mem_mb']:.0f} MB ETA {fmt_time(eta)}")
