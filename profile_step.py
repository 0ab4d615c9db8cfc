"""Where one training step's time and FLOPs go: encoder, decoder + heads, loss and optimizer timed apart,
torch.profiler's top operators of the whole step, and FLOPs counted per operator and attributed to the part
whose parameter the operator reads (bench.py --profile prints them)."""
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import autocast
from step import train_step

aten = torch.ops.aten


def _prod(shape):
    total = 1
    for side in shape:
        total *= side
    return total


def op_flops(func, args, out):
    """Multiply-add FLOPs (2 per MAC) of one convolution or matrix product, counted from the shapes with the
    groups taken into account: a grouped or depthwise convolution's weight gradient costs what its forward
    costs, not groups times more (torch.utils.flop_counter's formula drops the groups there)."""
    if func is aten.convolution.default:
        return 2 * _prod(out.shape) * _prod(args[1].shape[1:])
    if func is aten.convolution_backward.default:
        grad_out, weight, mask = args[0], args[2], args[-1]
        return 2 * _prod(grad_out.shape) * _prod(weight.shape[1:]) * (int(mask[0]) + int(mask[1]))
    if func in (aten.mm.default, aten.addmm.default):
        a, b = (args[0], args[1]) if func is aten.mm.default else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if func is aten.bmm.default:
        return 2 * _prod(args[0].shape) * args[1].shape[-1]
    return 0


class _PartFlops(TorchDispatchMode):
    """FLOPs per (part, phase): an operator belongs to the top-level module (encoder, decoder, heads) whose
    parameter is among its arguments; a weight gradient's matmul reads no parameter and counts as "unattributed"."""

    def __init__(self, model):
        super().__init__()
        self.owner = {p.untyped_storage().data_ptr(): name.split(".")[0]
                      for name, p in model.named_parameters()}
        self.flops = collections.Counter()
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flops = op_flops(func, args, out)
        if flops:
            parts = [self.owner.get(a.untyped_storage().data_ptr()) for a in args if isinstance(a, torch.Tensor)]
            part = next((p for p in parts if p), "unattributed")
            self.flops[(part, self.phase)] += flops
        return out


def step_flops(model, criterion, x, y):
    """{(part, phase): GFLOPs per image} of one forward and backward of the batch x."""
    counter = _PartFlops(model)
    with counter:
        loss = criterion(model(x), y)
        counter.phase = "backward"
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {key: value / 1e9 / len(x) for key, value in sorted(counter.flops.items())}


def _median_s(fn, repeats, device):
    """Median seconds of fn over repeats calls after one untimed call, the GPU drained around each."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tensors(logits):
    return list(logits.values()) if isinstance(logits, dict) else [logits]


def part_times(parts, micro, cfg, device, repeats):
    """Median seconds of the whole train_step and of its parts run apart on the same batch: encoder forward +
    backward (from fixed feature gradients), decoder + heads forward + backward (features detached, their
    gradients still computed as in the step), the loss forward + backward on detached logits, the AdamW step."""
    model, criterion, optimizer = parts.raw_model, parts.criterion, parts.optimizer
    x, y = micro[0]
    size = x.shape[-2:]
    model.train()
    with torch.no_grad(), autocast(cfg["precision"], device):
        features = model.encode(x)
        logits = model.decode(features, size)
    feature_grads = [torch.randn_like(f) for f in features]
    logit_grads = [torch.randn_like(t) for t in _tensors(logits)]

    def encoder():
        with autocast(cfg["precision"], device):
            torch.autograd.backward(model.encode(x), feature_grads)

    def decoder():
        with autocast(cfg["precision"], device):
            out = model.decode([f.detach().requires_grad_() for f in features], size)
        torch.autograd.backward(_tensors(out), logit_grads)

    def loss():
        if isinstance(logits, dict):
            criterion({k: v.detach().requires_grad_() for k, v in logits.items()}, y).backward()
        else:
            criterion(logits.detach().requires_grad_(), y).backward()

    times = {"step": _median_s(lambda: train_step(parts, micro, cfg, device), repeats, device)}
    for name, fn in (("encoder", encoder), ("decoder+heads", decoder), ("loss", loss)):
        times[name] = _median_s(fn, repeats, device)
    # AdamW on the gradients the parts above left (every parameter has one), as in the step.
    times["optimizer"] = _median_s(optimizer.step, repeats, device)
    optimizer.zero_grad(set_to_none=True)
    return times


def top_ops(parts, micro, cfg, device, steps, count=15):
    """torch.profiler's operator table (self CPU time) over `steps` training steps, the first `count` rows."""
    from torch.profiler import ProfilerActivity, profile
    train_step(parts, micro, cfg, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(parts, micro, cfg, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=count)


def report(parts, micro, cfg, device, repeats):
    """The three views as printable text: part times (ms and % of the step), FLOPs per part, top operators."""
    x, y = micro[0]
    times = part_times(parts, micro, cfg, device, repeats)
    step = times["step"]
    lines = [f"{cfg['encoder']}/{cfg['decoder']} {cfg['img_size']} px, batch {len(x)}, {cfg['precision']}, "
             f"{torch.get_num_threads()} threads: medians of {repeats} repeats", "",
             "| part | ms | % of the step |", "|---|---|---|"]
    lines += [f"| {name} | {seconds * 1e3:.1f} | {100 * seconds / step:.1f} |" for name, seconds in times.items()]
    parts_sum = sum(seconds for name, seconds in times.items() if name != "step")
    lines += [f"| sum of the parts | {parts_sum * 1e3:.1f} | {100 * parts_sum / step:.1f} |", ""]
    flops = step_flops(parts.raw_model, parts.criterion, x, y)
    lines += ["| part | phase | GFLOPs/img |", "|---|---|---|"]
    lines += [f"| {part} | {phase} | {value:.2f} |" for (part, phase), value in flops.items()]
    lines += [f"| all | forward + backward | {sum(flops.values()):.2f} |", "",
              top_ops(parts, micro, cfg, device, max(1, repeats // 2))]
    return "\n".join(lines)
