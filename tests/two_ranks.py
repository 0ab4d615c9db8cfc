"""Helper the tests start under torchrun (2 gloo ranks on the CPU): checks that need a real process group.

    python -m torch.distributed.run --nproc_per_node=2 tests/two_ranks.py CHECK OUT_DIR [DATA]

CHECK is one of:
- step: one training step's loss and gradients under DDP (each rank half of a fixed global batch), written
  beside those of one process on the whole batch and of one process with micro-batches of one image;
- autobatch: --batch-size auto's agreement with out-of-memory injected at 33 images on rank 0 and 63 on rank 1;
- probe: the real --batch-size auto probe step runs no collective;
- ema: three DDP training steps with --ema (each rank half of a fixed global batch), no collective of its own.
Each rank writes OUT_DIR/CHECK-RANK.json (and .pt for tensors).
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import autobatch  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import files  # noqa: E402
import preload  # noqa: E402
import step  # noqa: E402
import train  # noqa: E402

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "barrier", "reduce", "gather", "scatter")


def count_collectives():
    """{name: calls} of torch.distributed collectives from here on (wrapping them in this process)."""
    calls = {name: 0 for name in COLLECTIVES}
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        setattr(dist, name, counted)
    return calls


def tiny_cfg(*flags):
    args = config.parse_args(["--encoder", "mit_b0", "--img-size", "64", "--norm", "gn", "--batch-size", "4", *flags])
    return config.resolve_config(args, 1, torch.device("cpu"))


def global_batch(data_root, cfg):
    samples = files.list_samples(data_root)[:4]
    pre = preload.preload(samples, preload.RowFormat(64, data.run_scheme(cfg)), mode="disk")
    images, masks = next(iter(data.batches(pre, list(range(4)), 4, pin=False)))
    return data.to_device_batch(images, masks, "cpu", torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]),
                                channels_last=cfg["channels_last"])


def gradients(cfg, micro, world, rank):
    """(loss, {name: gradient}) of one accumulate_gradients over micro (with world ranks' sums). The network
    runs in float64: in float32, batch-size-dependent rounding flips ReLUs whose input is within ~1e-7 of 0,
    and each flip changes a gradient by a whole upstream value (0.16 % of the largest one, seen on mit_b0)."""
    torch.manual_seed(0)
    network = step.build_network(cfg, torch.device("cpu"), world).double()
    micro = [(x.double(), y) for x, y in micro]
    weights = torch.linspace(0.5, 2.0, cfg["num_classes"]).numpy()
    parts = step.build_training(cfg, network, world, torch.device("cpu"), 10, weights)
    loss = step.accumulate_gradients(parts, micro, cfg, torch.device("cpu"))
    return float(loss), {n: p.grad.clone() for n, p in parts.raw_model.named_parameters() if p.grad is not None}


def check_step(out, rank, world, data_root, loss_name):
    cfg = tiny_cfg("--loss", loss_name)
    x, y = global_batch(data_root, cfg)
    half = slice(rank * 2, rank * 2 + 2)
    results = {"ddp": gradients(dict(cfg, per_rank_batch=2), [(x[half], y[half])], world, rank)}
    if rank == 0:
        # One process after the group's work: its sums must not be added over ranks (parts.world is 1).
        results["one"] = gradients(cfg, [(x, y)], 1, rank)
        results["micro"] = gradients(dict(cfg, micro_batch=1, accum_steps=4),
                                     [(x[i:i + 1], y[i:i + 1]) for i in range(4)], 1, rank)
    torch.save({k: {"loss": v[0], "grads": v[1]} for k, v in results.items()}, out / f"step-{loss_name}-{rank}.pt")


def check_autobatch(out, rank, world):
    limit = (33, 63)[rank]
    probed = []

    def step(batch):
        probed.append(batch)
        if batch > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    calls = count_collectives()
    found = autobatch.find_batch_size(step, torch.device("cpu"), 500, world)
    (out / f"autobatch-{rank}.json").write_text(json.dumps({"found": found, "probed": probed, "calls": calls}))


def check_probe(out, rank, world):
    cfg = tiny_cfg()
    step = train.probe_step(cfg, torch.device("cpu"))
    calls = count_collectives()
    step(2)
    probe_calls = dict(calls)
    found = autobatch.find_batch_size(step, torch.device("cpu"), 5, world)
    (out / f"probe-{rank}.json").write_text(json.dumps({"probe_calls": probe_calls, "calls": calls, "found": found}))


def check_ema(out, rank, world, data_root):
    cfg = dict(tiny_cfg("--ema", "--epochs", "1"), per_rank_batch=2)
    x, y = global_batch(data_root, cfg)
    torch.manual_seed(0)
    network = step.build_network(cfg, torch.device("cpu"), world)
    parts = step.build_training(cfg, network, world, torch.device("cpu"), 4)
    initial = {k: v.clone() for k, v in parts.ema.model.state_dict().items()}
    half = slice(rank * 2, rank * 2 + 2)
    for _ in range(3):
        step.train_step(parts, [(x[half], y[half])], cfg, torch.device("cpu"))
    torch.save({"initial": initial, "ema": parts.ema.model.state_dict()}, out / f"ema-{rank}.pt")


def main():
    check, out = sys.argv[1], Path(sys.argv[2])
    rank, world, *_ = distributed.setup_distributed(120)
    try:
        if check.startswith("step"):
            check_step(out, rank, world, sys.argv[3], check.split("-")[1])
        elif check == "autobatch":
            check_autobatch(out, rank, world)
        elif check == "probe":
            check_probe(out, rank, world)
        elif check == "ema":
            check_ema(out, rank, world, sys.argv[3])
        distributed.barrier()
    finally:
        distributed.teardown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
