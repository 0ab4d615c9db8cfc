"""Throughput benchmarks: the real train_step and inference (img/s, memory, FLOPs, MFU) and the data loader.

    python bench.py --encoder mit_b3 --img-size 384 --bench-steps 50      # one row; bash bench.sh runs the table
    python bench.py --loader --img-size 384                                 # loader img/s and shared-memory PSS
    python bench.py --encoder convnext_tiny --img-size 64 --reference       # + smp's Unet, timed interleaved
    python bench.py --encoder mit_b3 --img-size 128 --reference --compile --reference-compile  # compiled, both
    python bench.py --encoder convnext_tiny --img-size 128 --profile        # where the step's time and FLOPs go

Takes train.py's flags, so a row measures exactly what training would run.
"""
import collections
import json
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from config import build_parser, check_numbers, label_scheme


def build_bench_parser():
    """train.py's flags plus the benchmark's own group."""
    parser = build_parser()
    parser.description = __doc__.splitlines()[0]
    group = parser.add_argument_group("benchmark")
    group.add_argument("--bench-steps", type=int, default=20, help="timed training steps after the warm-up")
    group.add_argument("--bench-out", default=None, help="append the JSON result line to this file (default: "
                       "print only)")
    group.add_argument("--peak-tflops", type=float, default=None, help="device peak (TFLOP/s) for MFU (default: "
                       "detected)")
    group.add_argument("--reference", action="store_true",
                       help="also time segmentation_models_pytorch's Unet/UPerNet of the same encoder (same size, "
                            "batch, precision, AdamW, loss), alternating with ours; needs segmentation-models-pytorch")
    group.add_argument("--reference-compile", action="store_true",
                       help="with --reference: torch.compile the reference's training step and inference too, "
                            "as --compile does ours (default: smp eager, as its users run it)")
    group.add_argument("--bench-rounds", type=int, default=3,
                       help="with --reference: alternating ours/reference rounds; img/s are their medians")
    group.add_argument("--profile", action="store_true",
                       help="instead: the step's parts timed apart (--bench-steps repeats), FLOPs per part and "
                            "torch.profiler's top operators (profile_step.py)")
    group.add_argument("--loader", action="store_true",
                       help="instead: loader img/s (preloaded vs PNG decoding) and shared-memory PSS at --img-size")
    group.add_argument("--loader-count", type=int, default=64, help="generated images for --loader")
    group.add_argument("--loader-source-size", type=int, default=1024, help="side of the generated PNGs (px)")
    return parser


if __name__ == "__main__":
    # --help and flag mistakes answer before torch loads (seconds on a cold node); main() parses again.
    build_bench_parser().parse_args()

import numpy as np
import torch
from PIL import Image

import data
import profile_step
from distributed import Run
from files import dataset_scheme, list_samples
from heap import keep_freed_memory
from labels import UserError, artefact_scheme, run_cli
from logs import peak_memory_mb
from model import autocast
from preload import RowFormat, cores, preload
from step import build_network, build_training, make_criterion, train_step
from train import run_main

# Our encoder names -> segmentation_models_pytorch encoder names of the same network ("tu-" = timm inside
# smp); other timm models are tried as "tu-NAME". Encoders that smp cannot build get the reference "n/a".
SMP_ENCODERS = {"convnext_tiny": "tu-convnext_tiny", **{f"mit_b{i}": f"mit_b{i}" for i in range(6)},
                "maxvit_tiny": "tu-maxvit_tiny_tf_384", "swin_tiny": "tu-swin_tiny_patch4_window7_224",
                "coatnet_0": "tu-coatnet_0_rw_224"}
SMP_DECODERS = {"unet": "Unet", "upernet": "UPerNet"}
# The reference of a bench run (_reference): smp's encoder name, its model and train step, or model None and the
# reason there is no equivalent.
Reference = collections.namedtuple("Reference", "name model step reason")
# How a bench run is timed: rounds of steps calls each, after warmup untimed calls in the first round.
Timing = collections.namedtuple("Timing", "rounds steps warmup")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps, warmup, device):
    """Seconds for `steps` calls of fn after `warmup` untimed ones, the device drained before and after."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - start


def _loader_img_s(pre, run, epochs=None):
    """Images per second of the training data path as train.py runs it (data.train_batches: this rank's crops
    and flips, the --scale-aug/--colour-aug/--blur-aug augmentation, normalised on the device; --device-data
    cuts them there), over whole epochs of about 512 images; None when an epoch has no full batch."""
    device = run.device
    rows = data.rows_on_device(pre, device) if run.cfg.get("device_data") else None
    epochs = epochs or max(1, 512 // len(pre))
    start, loaded = time.perf_counter(), 0
    for epoch in range(epochs):
        for x, _ in data.train_batches(pre, run, epoch, 0, rows=rows):
            loaded += len(x)
    _sync(device)
    return round(loaded / (time.perf_counter() - start), 1) if loaded else None


def _reference(run, parts):
    """A Reference: segmentation_models_pytorch's model of the same encoder and decoder, trained with our AdamW
    settings and our loss module; model None with the reason when there is no equivalent. smp is imported here
    only (a test-only dependency, never used by training)."""
    import segmentation_models_pytorch as smp
    cfg, device = run.cfg, run.device
    name = SMP_ENCODERS.get(cfg["encoder"], "tu-" + cfg["encoder"])
    if cfg["heads"] != "fine" or cfg["decoder"] not in SMP_DECODERS or run.world > 1:
        return Reference(name, None, None, "smp has no equivalent of --heads/--decoder/multi-rank here")
    try:
        kwargs = {"img_size": cfg["img_size"]} if name.startswith("tu-") else {}
        classes = cfg["num_classes"]
        try:
            model = getattr(smp, SMP_DECODERS[cfg["decoder"]])(name, encoder_weights=None, classes=classes, **kwargs)
        except TypeError:  # a timm CNN without img_size
            model = getattr(smp, SMP_DECODERS[cfg["decoder"]])(name, encoder_weights=None, classes=classes)
        model = model.to(device)
        if cfg["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
    except Exception as err:  # smp lacks this encoder or cannot build it at this size
        return Reference(name, None, None,
                         f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
    defaults = parts.optimizer.defaults
    optimizer = torch.optim.AdamW(model.parameters(), lr=defaults["lr"], weight_decay=defaults["weight_decay"],
                                  fused=defaults["fused"])
    criterion = make_criterion(cfg, np.ones(cfg["num_classes"]), device)
    net = torch.compile(model) if cfg["reference_compile"] else model

    def step(micro):
        net.train()
        for x, y in micro:
            with autocast(cfg["precision"], device):
                outputs = net(x)
            criterion(outputs, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return Reference(name, net, step, None)


def bench(run):
    """Times the real train_step and inference after warm-up; one JSON line with throughput, memory, FLOPs, MFU.

    With --reference, segmentation_models_pytorch's model of the same encoder is timed in the same process,
    alternating with ours for --bench-rounds rounds; img/s are then medians over the rounds, for both."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg, rank, world, device = run.cfg, run.rank, run.world, run.device
    cfg["data"] = "synthetic"
    cfg.update(label_scheme("synthetic", None, cfg["heads"]))
    train_pre = data.load_split(cfg, run.local_rank, run.local_world, needed=("train",))["train"].pre
    keep_freed_memory(device)  # as train.py's CPU runs; the reference in this process gets it too
    steps, warmup = cfg["bench_steps"], max(2, cfg["bench_steps"] // 4)
    rounds = max(1, cfg["bench_rounds"]) if cfg["reference"] else 1
    parts = build_training(dict(cfg, epochs=1), build_network(cfg, device, world), world, device,
                           2 * (rounds * steps + warmup) + 1, np.ones(cfg["num_classes"]))
    generator = torch.Generator().manual_seed(cfg["seed"])
    flips = torch.randint(0, 2, (len(train_pre), 3), generator=generator).bool()
    index = torch.arange(cfg["per_rank_batch"]) % len(train_pre)
    micro = [data.to_device_batch(images, masks, device, flips[index[:len(images)]],
                                  channels_last=cfg["channels_last"])
             for images, masks in data.batches(train_pre, index, cfg["micro_batch"], pin=device.type == "cuda")]
    if cfg["profile"]:
        if rank == 0:
            print(profile_step.report(parts, micro, cfg, device, steps), flush=True)
        return None
    model, x = parts.raw_model, micro[0][0]
    ref = _reference(run, parts) if cfg["reference"] else Reference(None, None, None, None)
    times, peak = _time_rounds(parts, micro, ref, run, Timing(rounds if ref.model is not None else 1, steps, warmup))
    with torch.no_grad():
        flops = FlopCounterMode(display=False)
        with flops:
            model(x[:1])
    train_s, infer_s = statistics.median(times["train"]), statistics.median(times["infer"])
    train_img_s = steps * cfg["batch_size"] / train_s
    gflops = flops.get_total_flops() / 1e9
    peak_tflops = cfg["peak_tflops"] or _peak_tflops(device, cfg["precision"])
    result = {"encoder": cfg["encoder"], "decoder": cfg["decoder"], "heads": cfg["heads"],
              "img_size": cfg["img_size"], "batch": cfg["batch_size"], "world": world,
              "precision": cfg["precision"], "channels_last": cfg["channels_last"], "compile": cfg["compile"],
              "clip": cfg["clip"], "train_img_s": train_img_s, "infer_img_s": steps * len(x) * world / infer_s,
              "peak_mem_mb": peak, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "gflops": gflops, "loader_img_s": _loader_img_s(train_pre, run),
              # Training costs ~3x the forward FLOPs (forward + two backward matmuls per forward one).
              "mfu": 3 * gflops * 1e9 * train_img_s / (peak_tflops * 1e12 * world) if peak_tflops else None,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "fused_adamw": bool(parts.optimizer.defaults.get("fused")),
              "rounds": len(times["train"])}
    if cfg["reference"]:
        result.update(_reference_fields(result, ref, times, steps, len(x) * world),
                      ref_compile=cfg["reference_compile"])
    if rank == 0:
        print(json.dumps(result), flush=True)
        if cfg["bench_out"]:
            with open(cfg["bench_out"], "a") as f:
                f.write(json.dumps(result) + "\n")
    return result


def _time_rounds(parts, micro, ref, run, timing):
    """Seconds per round of ours and the reference (a Reference), alternating (train, then inference), and our
    peak memory. Ours runs first in even rounds and the reference first in odd ones, so that neither is always
    timed on the other's heels (a warm cache, a heap the other just grew); round 0 warms both up, ours first."""
    cfg, device, (rounds, steps, warmup) = run.cfg, run.device, timing
    x = micro[0][0]
    # With --compile, inference is timed compiled too (the raw model compiled on its own, as for training).
    model = torch.compile(parts.raw_model) if cfg["compile"] else parts.raw_model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def infer_of(net):
        def infer():
            with torch.no_grad(), autocast(cfg["precision"], device):
                net(x)
        return infer

    def train_ours():
        model.train()
        train_step(parts, micro, cfg, device)
    calls, nets = {"train": train_ours, "infer": infer_of(model)}, [model]
    if ref.model is not None:
        calls.update(ref_train=lambda: ref.step(micro), ref_infer=infer_of(ref.model))
        nets.append(ref.model)
    times = {"train": [], "infer": [], "ref_train": [], "ref_infer": []}
    peak = None
    for r in range(rounds):
        for kind in ("train", "infer"):
            if kind == "infer":  # the training steps set train mode themselves
                for net in nets:
                    net.eval()
            order = (kind, "ref_" + kind) if r % 2 == 0 else ("ref_" + kind, kind)
            for name in (name for name in order if name in calls):
                times[name].append(_timed(calls[name], steps, warmup if r == 0 else 0, device))
                peak = peak if peak is not None else peak_memory_mb(device)  # ours, before the reference ran
    return times, peak


def _reference_fields(result, ref, times, steps, infer_batch):
    """The reference's img/s and our ratios to them, or n/a with the reason."""
    if ref.model is None:
        return dict(ref_encoder=ref.name, ref_train_img_s=None, ref_infer_img_s=None, train_x_ref=None,
                    infer_x_ref=None, ref_note=f"n/a: {ref.reason}")
    ref_train = steps * result["batch"] / statistics.median(times["ref_train"])
    ref_infer = steps * infer_batch / statistics.median(times["ref_infer"])
    return dict(ref_encoder=ref.name, ref_train_img_s=ref_train, ref_infer_img_s=ref_infer,
                ref_params_m=sum(p.numel() for p in ref.model.parameters()) / 1e6,
                train_x_ref=result["train_img_s"] / ref_train, infer_x_ref=result["infer_img_s"] / ref_infer)


# The first key found in the card's name wins: the PCIe/NVL variants before their SXM names, A100 before A10.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def _peak_tflops(device, precision):
    """Dense bf16/fp16 tensor-core peak of known cards (vendor datasheets, half their sparse figures); None
    means MFU is not reported: a CPU, an unknown card, or --precision fp32, which runs without TF32
    (train.set_backends), so no tensor-core peak applies to it."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def mapped_pss(path, pid="self"):
    """(Rss, Pss) in bytes of pid's mappings of path, from /proc/PID/smaps."""
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
            elif inside and line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
    return rss, pss


def rollup_pss_shmem(pid="self"):
    """Pss_Shmem of the whole process in bytes, from /proc/PID/smaps_rollup (0 where the kernel lacks it)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def _bench_data(root, count, source_size, seed=42):
    """count images with one damage class of ARTeFACT's scheme each (the loader bench reads them with it)."""
    rng, damage = np.random.default_rng(seed), artefact_scheme().damage_ids
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    yy, xx = np.mgrid[0:source_size, 0:source_size]
    for i in range(count):
        base = (np.sin(xx / (20 + i)) + np.cos(yy / (30 + i))) * 60 + 128
        image = np.clip(base[..., None] + rng.normal(0, 8, (source_size, source_size, 3)), 0, 255).astype(np.uint8)
        mask = ((base > 170) * damage[i % len(damage)]).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"bench_{i:04d}.png")
        Image.fromarray(mask).save(root / "annotations" / f"bench_{i:04d}.png")
    return root


def _touch(pre):
    return int(pre.buffer.sum(dtype=np.uint64))


def _second_rank(samples, form, conn):
    pre = preload(samples, form, node=(1, 2))
    _touch(pre)
    conn.send((*mapped_pss(pre.path), rollup_pss_shmem()))
    conn.recv()
    pre.close()


# What --loader measures the host path with: no augmentation, each kind alone, and all of them (the recipe's
# mmsegmentation-like scale 0.5-2.0 and torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1), a fifth blurred).
LOADER_AUGMENTATIONS = {"plain": {}, "scale": {"scale_aug": [0.5, 2.0]}, "colour": {"colour_aug": 0.4},
                        "blur": {"blur_aug": 0.2}, "all": {"scale_aug": [0.5, 2.0], "colour_aug": 0.4, "blur_aug": 0.2}}


def _loader_cfg(size, batch, augmentation):
    """The run config keys data.train_batches reads, for one process, one micro-batch per step."""
    return {"seed": 0, "img_size": size, "rare_crops": 0.5, "batch_size": batch, "per_rank_batch": batch,
            "micro_batch": batch, "accum_steps": 1, "channels_last": True, "scale_aug": None, "colour_aug": 0.0,
            "blur_aug": 0.0, **augmentation}


def _torchvision_img_s(root, size, batch, epochs, augmented=False):
    """What a user would otherwise write: torchvision transforms.v2 over the PNG files in a DataLoader with 2
    workers (decode, random crop, flips, float, normalise per sample); augmented adds the equivalent of "all":
    RandomResizedCrop of square windows of side size/2 to 2 x size (what --scale-aug 0.5,2.0 cuts),
    ColorJitter(0.4, 0.4, 0.4, 0.1) and a Gaussian blur (sigma 0.1-2.0) of a fifth of the crops. Timed over
    epochs after one untimed epoch."""
    from torchvision import tv_tensors
    from torchvision.io import decode_image
    from torchvision.transforms import v2

    crop = [v2.RandomCrop(size), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if augmented:
        with Image.open(list_samples(root)[0].image) as first:
            area = first.size[0] * first.size[1]
        crop = [v2.RandomResizedCrop(size, scale=(size ** 2 / 4 / area, min(1.0, 4 * size ** 2 / area)), ratio=(1, 1)),
                v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
                v2.RandomApply([v2.GaussianBlur(2 * 6 + 1, sigma=(0.1, 2.0))], p=0.2)]
    transform = v2.Compose([*crop, v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.MEAN, data.STD)])

    class PngCrops(torch.utils.data.Dataset):
        def __init__(self, samples):
            self.samples = samples

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            image = tv_tensors.Image(decode_image(str(self.samples[i].image), mode="RGB"))
            mask = decode_image(str(self.samples[i].mask))
            return transform(image, tv_tensors.Mask(mask))

    loader = torch.utils.data.DataLoader(PngCrops(list_samples(root)), batch_size=batch, shuffle=True,
                                         num_workers=2, persistent_workers=True)
    for _ in loader:
        pass  # untimed, as for the host path: the workers start and warm up once per run
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _ in loader:
            seen += len(images)
    return round(seen / (time.perf_counter() - start), 1)


def _shared_memory(pre, samples):
    """The shared file's PSS (MiB) mapped by this process alone, then by this one and a second one."""
    _touch(pre)
    mib = 2 ** 20
    result = {"array_mib": round(pre.nbytes / mib, 1), "pss_1proc_mib": round(mapped_pss(pre.path)[1] / mib, 1),
              "rollup_pss_shmem_1proc_mib": round(rollup_pss_shmem() / mib, 1)}
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    other = context.Process(target=_second_rank, args=(samples, pre.form, child))
    other.start()
    _, other_pss, other_rollup = parent.recv()
    mine = mapped_pss(pre.path)[1]
    result["pss_2proc_mib"] = [round(mine / mib, 1), round(other_pss / mib, 1)]
    result["pss_2proc_total_mib"] = round((mine + other_pss) / mib, 1)
    result["rollup_pss_shmem_2proc_mib"] = [round(rollup_pss_shmem() / mib, 1), round(other_rollup / mib, 1)]
    parent.send("done")
    other.join()
    return result


def _loader_batch(args):
    """--batch-size for --loader (32 unless given), after the flags' range checks."""
    check_numbers(args)
    if args.loader_count < 1:
        raise UserError(f"--loader-count {args.loader_count}: must be at least 1 (images)")
    if args.loader_source_size < args.img_size:
        raise UserError(f"--loader-source-size {args.loader_source_size}: must be at least --img-size "
                        f"{args.img_size}")
    try:
        batch = int(args.batch_size or 32)
    except ValueError:
        raise UserError(f"--batch-size {args.batch_size}: --loader takes a number of images") from None
    if batch < 1:
        raise UserError(f"--batch-size {batch}: must be at least 1")
    return batch


def bench_loader(args, epochs=8):
    """Training data path throughput of --img-size crops, batches of --batch-size (32 unless given), from
    --data (a folder or synthetic) or --loader-count generated --loader-source-size PNGs at --work-size,
    measured in one run, each path after an untimed epoch (ours over epochs epochs, torchvision's over a
    quarter of them): the host path (data.train_batches on the CPU, what CPU training runs) without
    augmentation, with each kind and with all (LOADER_AUGMENTATIONS); on a GPU also the host-cut path (crops
    cut on the host, one pinned copy per batch, augmented and normalised on the GPU) and --device-data (the rows
    on the GPU, crops cut there), plain and with all; a torchvision transforms.v2 + DataLoader (2 workers) PNG
    loader, plain and with the equivalent augmentation; the shared file's PSS."""
    size, batch, work_size = args.img_size, _loader_batch(args), args.work_size
    folder = data.resolve_data(args.data, args.synthetic_count, args.synthetic_size) if args.data else None
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(folder) if folder else _bench_data(Path(scratch) / "bench", args.loader_count,
                                                       args.loader_source_size)
        samples = list_samples(root)
        if len(samples) < batch:
            raise UserError(f"--batch-size {batch}: more than the {len(samples)} images of "
                            f"{folder or f'--loader-count {args.loader_count}'}; lower it or give more images")
        # The generated set paints ARTeFACT's damage ids.
        scheme = dataset_scheme(root)[0] if folder else artefact_scheme()
        start = time.perf_counter()
        pre = preload(samples, RowFormat(size, scheme, work_size=work_size))
        result = {"size": size, "work_size": work_size, "images": len(samples), "batch": batch,
                  "source": str(folder or f"{args.loader_source_size} px PNG"),
                  "torch_threads": torch.get_num_threads(), "cores": cores(),
                  "build_s": round(time.perf_counter() - start, 2)}
        for name, augmentation in LOADER_AUGMENTATIONS.items():
            run = Run(_loader_cfg(size, batch, augmentation), torch.device("cpu"))
            # Untimed: the first epoch maps the reused buffers, which a run does once, not every epoch.
            _loader_img_s(pre, run, epochs=1)
            result[f"host_{name}_img_s"] = _loader_img_s(pre, run, epochs=epochs)
        if torch.cuda.is_available():
            device = torch.device("cuda")
            for name in ("plain", "all"):
                cfg = _loader_cfg(size, batch, LOADER_AUGMENTATIONS[name])
                host_cut, on_device = Run(cfg, device), Run(dict(cfg, device_data=True), device)
                _loader_img_s(pre, host_cut, epochs=1)  # CUDA context and kernels, untimed
                result[f"cuda_host_cut_{name}_img_s"] = _loader_img_s(pre, host_cut, epochs=epochs)
                result[f"cuda_device_data_{name}_img_s"] = _loader_img_s(pre, on_device, epochs=epochs)
            result["device"] = torch.cuda.get_device_name(device)
        result["torchvision_png_img_s"] = _torchvision_img_s(root, size, batch, max(1, epochs // 4))
        result["torchvision_aug_img_s"] = _torchvision_img_s(root, size, batch, max(1, epochs // 4), augmented=True)
        result["x_torchvision"] = round(result["host_plain_img_s"] / result["torchvision_png_img_s"], 1)
        result["x_torchvision_aug"] = round(result["host_all_img_s"] / result["torchvision_aug_img_s"], 1)
        result.update(_shared_memory(pre, samples))
        pre.close()
    return result


def main(argv=None):
    args = build_bench_parser().parse_args(argv)
    if args.loader:
        return run_cli(lambda: print(json.dumps(bench_loader(args))))
    return run_main(args, bench)


if __name__ == "__main__":
    sys.exit(main())
