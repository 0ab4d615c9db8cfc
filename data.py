"""The training-time data path: dataset folder -> split -> node-shared preload -> an epoch's plan -> batches on
the device.

Crops (scaled, flipped) are cut from the shared buffer by host threads or on the device (--device-data); the
photometric distortion and the normalisation run on the uint8 batch on the device; nothing per-pixel runs in
Python. A library without a command line (ARTeFACT is ingested by prepare.py).
"""
if __name__ == "__main__":
    # Older instructions said `python data.py prepare`; running it must not look like success.
    import sys
    print("error: data.py has no command line; ingest ARTeFACT with `python prepare.py ingest --download` (or "
          "--parquet DIR) and check it with `python prepare.py check DIR`", file=sys.stderr)
    sys.exit(2)

import collections
import concurrent.futures
import contextlib
import threading
from pathlib import Path

import numpy as np
import torch

from augment import (SIGMA, STREAM_MARGIN, blur_, colour_normalize, crop_sides, device_crops, device_rows,
                     photometric_params)
from distributed import barrier, broadcast
from files import dataset_scheme, fingerprint, list_samples, read_metadata
from labels import ARTEFACT_SOURCE, GROUP_COLUMNS, UserError, artefact_scheme, scheme_from_dict
from preload import Preloaded, RowFormat, preload
from splits import Protocol, default_manifest_path, group_names, split_ids
from synthetic import make_synthetic
from writes import size_text, write_error

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SYNTHETIC_DIR = Path(__file__).resolve().parent / "data"
# Host buffers that finished generators handed back, by what they hold: on a CPU a fresh 20-100 MB tensor is
# mapped anew and pays its page faults on first use, every epoch (a fifth of the loader's time at 384 px).
_SPARE, _SPARE_LOCK = collections.defaultdict(list), threading.Lock()
# Batches gathered ahead of the one the loop holds, by this many threads; reused buffers make a ring of those
# ahead, the one held and the one before it.
PREFETCH, GATHER_THREADS = 2, 2
RING_SIZE = PREFETCH + 2
# Where batches cuts each row's crop, row-aligned with its indices: (n, 2) top-left corners, (n, 3) (hflip, vflip,
# rot90) flags and (n,) window sides; a field left None means the top-left corner, no flip, the crop's own side.
Crops = collections.namedtuple("Crops", "corners flips sides", defaults=(None, None, None))


def resolve_data(data, synthetic_count=64, synthetic_size=192):
    """--data value -> dataset folder; "synthetic" is generated once under data/synthetic-COUNT-SIZE/."""
    if data == "synthetic":
        root = SYNTHETIC_DIR / f"synthetic-{synthetic_count}-{synthetic_size}"
        try:
            return Path(make_synthetic(root, count=synthetic_count, size=synthetic_size, seed=42))
        except OSError as exc:
            error = write_error(root, exc, fix="--data synthetic generates its images once under "
                                f"{SYNTHETIC_DIR}: make it writable, or run once from a writable checkout")
            if error is None:
                raise
            raise error from None
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"--data {data}: folder not found; pass a dataset folder (images/ + annotations/), "
                        "run `python prepare.py ingest`, or use --data synthetic")
    return root


def data_scheme(data, classes=None, fallback=None):
    """(label scheme, where it came from) for a --data value and --classes FILE: the synthetic set is ARTeFACT's
    scheme (it writes that classes.json when generated); a folder's is files.dataset_scheme's."""
    if data == "synthetic" and not classes:
        return artefact_scheme(), f"the synthetic set ({ARTEFACT_SOURCE})"
    return dataset_scheme(data, classes, fallback)


def run_scheme(cfg):
    """The label scheme a run config carries (cfg["classes"], written by config.resolve_config)."""
    return scheme_from_dict(cfg["classes"], f"{cfg.get('run_dir', 'the run')} config (classes)")


def held_out(cfg):
    """The group a leave-one-group-out fold tests on, e.g. "material=Tesserae" (None for kfold and single
    splits), from the dataset's metadata in the split manifest's order; a --fold past the groups is one line."""
    if cfg["split"] not in GROUP_COLUMNS:
        return None
    names = group_names(resolve_data(cfg["data"], cfg["synthetic_count"], cfg["synthetic_size"]), cfg["split"])
    if not 0 <= cfg["fold"] < len(names):
        raise UserError(f"--fold {cfg['fold']}: --split {cfg['split']} has folds 0..{len(names) - 1} "
                        f"({', '.join(names)})")
    return f"{cfg['split']}={names[cfg['fold']]}"


def dataset_fingerprint(cfg, rank=0, local_rank=0):
    """files.fingerprint of cfg's dataset folder, the same on every rank (rank 0's: node-local copies of a
    synthetic set differ in their modification times); local rank 0 generates a synthetic set first."""
    if local_rank == 0:
        root = resolve_data(cfg["data"], cfg["synthetic_count"], cfg["synthetic_size"])
    barrier()
    if local_rank != 0:
        root = resolve_data(cfg["data"], cfg["synthetic_count"], cfg["synthetic_size"])
    digest = torch.tensor(list(bytes.fromhex(fingerprint(root) if rank == 0 else "0" * 16)), dtype=torch.int64)
    return bytes(broadcast(digest).tolist()).hex()


# One part of a fold: its samples, their preloaded pixels, and each sample's metadata group per column.
Part = collections.namedtuple("Part", "samples pre groups")


def split_protocol(cfg):
    """The run's split protocol; --split single holds out Protocol's default share of the images."""
    return Protocol(cfg["split"], cfg["folds"], cfg["seed"], inner_frac=cfg["inner_frac"])


def manifest_path(cfg, root):
    """--splits, or a manifest in the splits/ folder beside the run folder, shared by the folds of a run."""
    if cfg.get("splits"):
        return Path(cfg["splits"])
    return default_manifest_path(root, Path(cfg["run_dir"]).parent / "splits", split_protocol(cfg))


def _fold_ids(cfg, root):
    train, inner, test = split_ids(root, split_protocol(cfg), cfg["fold"], manifest_path(cfg, root))
    if cfg["select"] == "last":
        # A fixed schedule selects nothing, so the inner images train too.
        held = set(test)
        train, inner = [i for i in sorted(train + inner) if i not in held], []
    return {"train": train, "val": inner, "test": test}


def _groups(metadata, samples):
    columns = [c for c in GROUP_COLUMNS if any(c in row for row in metadata.values())]
    return {c: [metadata.get(s.id, {}).get(c) or "unknown" for s in samples] for c in columns}


def part_samples(cfg, name):
    """The samples of one part (train, val or test) of cfg's fold, with no preload and no collective: for
    reports and tools that run on one rank."""
    root = resolve_data(cfg["data"], cfg["synthetic_count"], cfg["synthetic_size"])
    by_id = {s.id: s for s in list_samples(root)}
    return [by_id[i] for i in _fold_ids(cfg, root)[name]]


def load_split(cfg, local_rank=0, local_world=1, needed=("train", "val", "test")):
    """{name: Part} for the needed parts of cfg's fold: train, val (the inner validation split that selects
    the checkpoint; empty with --select last) and test (the outer fold, scored once). The preloaded arrays
    are shared by the node: local rank 0 builds them, the others map them."""
    def resolve():
        root = resolve_data(cfg["data"], cfg["synthetic_count"], cfg["synthetic_size"])
        return root, _fold_ids(cfg, root)

    # Local rank 0 generates the synthetic set and writes the split manifest before the others read them.
    if local_rank == 0:
        root, ids = resolve()
    barrier()
    if local_rank != 0:
        root, ids = resolve()
    by_id, metadata = {s.id: s for s in list_samples(root)}, read_metadata(root)
    scheme, parts = run_scheme(cfg), {}
    for name in needed:
        samples = [by_id[i] for i in ids[name]]
        shared = cfg["preload"] == "all" or (cfg["preload"] == "val" and name != "train")
        form = RowFormat(cfg["img_size"], scheme, cfg["work_size"], cfg["offline_aug"] and name == "train")
        pre = preload(samples, form, "shm" if shared else "disk", (local_rank, local_world))
        parts[name] = Part(samples, pre, _groups(metadata, samples))
    return parts


# A crop almost all outside the object (the ignore id) teaches nothing: it is drawn again, this many times at most.
MIN_VALID, REDRAWS = 0.1, 4


def _damage_centre(pre, row, class_weights, rng):
    """A stored pixel position (y, x) of a damage class (any but the scheme's clean id) present in the row, rarer
    classes (higher class weight) drawn more often; None when the row has no damage."""
    damage = np.array(pre.scheme.damage_ids, dtype=np.int64)
    present = damage[pre.counts[row, damage] > 0]
    if not len(present):
        return None
    odds = class_weights[present] / class_weights[present].sum()
    c = rng.choice(present, p=odds)
    points = pre.points[row, c]
    return points[rng.integers((points[:, 0] >= 0).sum())]


def _span(extent, side):
    """The range of a window's first coordinate along an axis: inside the row, or covering it when larger."""
    return min(extent - side, 0), max(extent - side, 0)


def _valid_share(pre, row, top, left, side):
    """Share of the side x side window at (top, left) of a row inside the object (not the ignore id); pixels off
    the row count as outside. A row without ignored pixels needs only the window's overlap with it, no pixel."""
    height, width = pre.shapes[row]
    y0, y1, x0, x1 = max(top, 0), min(top + side, height), max(left, 0), min(left + side, width)
    if y1 <= y0 or x1 <= x0:
        return 0.0
    if not pre.counts[row, -1]:
        return (y1 - y0) * (x1 - x0) / (side * side)
    return np.count_nonzero(pre.mask(row)[y0:y1, x0:x1] != pre.scheme.ignore) / (side * side)


def epoch_crops(pre, size, seed, epoch, rare_crops, class_weights):
    """(n, 2) top-left corners of every row's training crop in an epoch, from (seed, epoch) alone, so any
    number of ranks and a resumed run draw the same crops. size: the crops' side, or (n,) sides, one per row
    (scaled crops, see augment.crop_sides); a side larger than the row places the row inside the window. A share
    rare_crops of the crops is centred on a damage pixel (see _damage_centre); a crop with less than MIN_VALID
    of its pixels inside the object is redrawn."""
    rng = np.random.default_rng([seed, epoch, 2])
    weights = np.ones(pre.counts.shape[1] - 1) if class_weights is None else np.asarray(class_weights, float)
    corners = np.zeros((len(pre), 2), dtype=np.int64)
    sides = np.broadcast_to(np.asarray(size, np.int64), (len(pre),))
    for row, ((height, width), side) in enumerate(zip(pre.shapes.tolist(), sides.tolist())):
        if (height, width) == (side, side):
            continue
        (top_low, top_high), (left_low, left_high) = _span(height, side), _span(width, side)
        for _ in range(REDRAWS):
            centre = _damage_centre(pre, row, weights, rng) if rng.random() < rare_crops else None
            if centre is None:
                top, left = rng.integers(top_low, top_high + 1), rng.integers(left_low, left_high + 1)
            else:
                top = min(max(int(centre[0]) - side // 2, top_low), top_high)
                left = min(max(int(centre[1]) - side // 2, left_low), left_high)
            corners[row] = top, left
            if _valid_share(pre, row, top, left, side) >= MIN_VALID:
                break
    return corners


@contextlib.contextmanager
def _borrowed(key, make):
    """A spare of key's buffers, else make()'s; one holder at a time, handed back when the block ends."""
    with _SPARE_LOCK:
        held = _SPARE[key].pop() if _SPARE[key] else make()
    try:
        yield held
    finally:
        with _SPARE_LOCK:
            _SPARE[key].append(held)


def _batch_buffers(size, pin, ring):
    """buffers(k, n): uint8 image and mask tensors for the k-th batch of n crops; fresh ones when ring is None,
    else the (k mod RING_SIZE)-th of ring (a dict), reused."""

    def fresh(n):
        # Margins either side let augment.colour_normalize read the images in place.
        images = torch.empty(n * size * size * 3 + 2 * STREAM_MARGIN, dtype=torch.uint8, pin_memory=pin)
        return (images[STREAM_MARGIN:-STREAM_MARGIN].view(n, size, size, 3),
                torch.empty((n, size, size), dtype=torch.uint8, pin_memory=pin))

    def buffers(k, n):
        if ring is None:
            return fresh(n)
        slot = ring.get(k % RING_SIZE)
        if slot is None or len(slot[0]) != n:
            slot = ring[k % RING_SIZE] = fresh(n)
        return slot
    return buffers


def batches(pre, indices, batch_size, crops=Crops(), pin=True, reuse=False):
    """Yields (images uint8 (B,S,S,3), masks uint8 (B,S,S)) CPU tensors: the S x S crops (S = pre.size) of pre's
    rows at indices, in order, as crops (a Crops, row-aligned with indices) says: at its corners (default the
    top-left corner), flipped by its flips while they are copied, its windows' sides resized to S (see
    preload.gather).

    GATHER_THREADS background threads gather the next PREFETCH batches into fresh (pinned, when CUDA is there)
    tensors, so a yielded batch stays valid however long the caller keeps it. With reuse, a ring of RING_SIZE
    buffers is filled in turn instead (fresh ~20 MB tensors cost their page faults every batch on a CPU), and
    handed to the next call once this one ends: a batch is then valid until the caller takes the second one
    after it or the call ends, enough for a loop that converts it at once.
    """
    indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(pre)):
        raise IndexError(f"batches: indices {indices.min()}..{indices.max()} outside 0..{len(pre) - 1}")
    size, n = pre.size, len(indices)
    crops = Crops(np.zeros((n, 2), np.int64) if crops.corners is None else np.asarray(crops.corners, np.int64),
                  np.zeros((n, 3), bool) if crops.flips is None else np.asarray(crops.flips, bool),
                  np.full(n, size, np.int64) if crops.sides is None else np.asarray(crops.sides, np.int64))
    pin = pin and torch.cuda.is_available()
    with (_borrowed(("ring", size, pin), dict) if reuse else contextlib.nullcontext()) as ring:
        yield from _gathered(pre, indices, batch_size, crops, _batch_buffers(size, pin, ring))


def _gathered(pre, indices, batch_size, crops, buffers):
    """batches' body: GATHER_THREADS threads gather the batches of crops into buffers(k, n), up to PREFETCH of
    them ahead of the one the caller holds (numpy's copies and torch's resize release the GIL, so the threads
    run in parallel)."""
    corners, flips, sides = crops

    def fill(k, start):
        part = slice(start, start + batch_size)
        images, masks = buffers(k, len(indices[part]))
        pre.gather(indices[part], corners[part], images.numpy(), masks.numpy(), flips[part], sides[part])
        return images, masks

    with concurrent.futures.ThreadPoolExecutor(GATHER_THREADS, thread_name_prefix="batches") as pool:
        pending = collections.deque()
        try:
            for k, start in enumerate(range(0, len(indices), batch_size)):
                pending.append(pool.submit(fill, k, start))
                if len(pending) > PREFETCH:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def device_batches(rows, indices, batch_size, plan, size):
    """Like batches, from the rows on the device (augment.device_rows): each batch of indices cut there by
    index arithmetic at the plan's corners and sides, and flipped there; the host sends a few numbers per row."""
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        images, masks = device_crops(rows, idx, plan.corners[idx], plan.sides[idx], size)
        yield flip_batch(images, masks, torch.from_numpy(plan.flips[idx]))


def rows_on_device(pre, device):
    """--device-data: the training rows on the device (augment.device_rows); refused when they were not
    preloaded or would take more than half of the GPU's free memory (the model needs the rest)."""
    if not isinstance(pre, Preloaded):
        raise UserError("--device-data: needs the training images preloaded; drop --preload none/val")
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if pre.layout.counts_offset > free / 2:
            raise UserError(f"--device-data: the preloaded rows take {size_text(pre.layout.counts_offset)}, more "
                            f"than half of the {size_text(free)} free on {device}; drop --device-data "
                            "or lower --work-size")
    return device_rows(pre, device)


# An epoch's augmentation: order (rows in training order) and, row-aligned with the part's rows, flips
# (hflip, vflip, rot90), crop corners and window sides, photometric params (augment.photometric_params or None).
Plan = collections.namedtuple("Plan", "order flips corners sides photometric")


def epoch_order(seed, epoch, n):
    """Sample order and flips of an epoch, from (seed, epoch) only: every world size sees the same global
    batches, and a resumed run continues exactly where an uninterrupted one would be."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator)
    return order.numpy(), torch.randint(0, 2, (n, 3), generator=generator).bool().numpy()


def epoch_plan(pre, cfg, epoch, class_weights=None):
    """Everything random about an epoch's training crops, from (cfg's seed, epoch) alone (see Plan)."""
    seed, size = cfg["seed"], cfg["img_size"]
    order, flips = epoch_order(seed, epoch, len(pre))
    sides = crop_sides(len(pre), size, cfg.get("scale_aug"), seed, epoch)
    corners = epoch_crops(pre, sides, seed, epoch, cfg["rare_crops"], class_weights)
    photometric = photometric_params(len(pre), cfg.get("colour_aug", 0), cfg.get("blur_aug", 0), seed,
                                             epoch)
    return Plan(order, flips, corners, sides, photometric)


def train_batches(pre, run, epoch, step0, class_weights=None, rows=None):
    """run's rank's micro-batches (x, y) for steps step0.. of an epoch, cropped, augmented and normalised
    (to_device_batch) on its device: the epoch's plan comes from (seed, epoch) alone, its global batches are split
    over the ranks, so every world size and a resumed run train on the same crops.

    rows (--device-data, rows_on_device): the crops are cut on the device. Otherwise a host thread cuts them
    from the shared buffer (flips on the way), then one copy per batch; on a CPU into buffers reused across
    steps and epochs, valid until the next step's micro-batches are made (train_step is done with them by then).
    """
    cfg, device = run.cfg, torch.device(run.device)
    plan = epoch_plan(pre, cfg, epoch, class_weights)
    per_rank, micro, on_cpu = cfg["per_rank_batch"], cfg["micro_batch"], device.type == "cpu"
    mine = plan.order[run.rank::run.world][step0 * per_rank: len(pre) // cfg["batch_size"] * per_rank]
    if rows is None:
        crops = batches(pre, mine, micro, Crops(plan.corners[mine], plan.flips[mine], plan.sides[mine]),
                        pin=not on_cpu, reuse=on_cpu)
    else:
        crops = device_batches(rows, mine, micro, plan, cfg["img_size"])
    with _borrowed(("outputs", cfg["accum_steps"]), lambda: [None] * cfg["accum_steps"]) as outputs:
        try:
            for k, (images, masks) in enumerate(crops):
                slot, part = k % cfg["accum_steps"], mine[k * micro:(k + 1) * micro]
                if on_cpu and (outputs[slot] is None or outputs[slot][1].shape != images.shape[:3]):
                    outputs[slot] = new_outputs(images)
                yield to_device_batch(images, masks, device, channels_last=cfg["channels_last"],
                                      out=outputs[slot],
                                      photometric=None if plan.photometric is None else plan.photometric[part])
        finally:
            crops.close()


_FLIPS = (lambda t: t.flip(2), lambda t: t.flip(1), lambda t: t.rot90(1, (1, 2)))


def flip_batch(images, masks, flags):
    """hflip, vflip, rot90 (in that order) of the samples whose (B, 3) host flags say so, in place; image and
    mask move together; rot90 is skipped for non-square batches."""
    device = images.device
    for k, flip in enumerate(_FLIPS):
        if k == 2 and images.shape[1] != images.shape[2]:
            continue
        # The flags live on the host, so choosing samples needs no device sync; writing only the chosen
        # samples measured ~20 % faster on CPU than a torch.where over the whole batch.
        chosen = flags[:, k].nonzero().squeeze(1).to(device, non_blocking=True)
        if len(chosen):
            images[chosen] = flip(images[chosen])
            masks[chosen] = flip(masks[chosen])
    return images, masks


def to_device_batch(images_u8, masks_u8, device, flips=None, channels_last=True, out=None, photometric=None):
    """Batch -> (x float (B,3,S,S) normalised, channels_last by default; y long (B,S,S)) on device.

    flips: None, or (B, 3) per-sample (hflip, vflip, rot90) flags, applied in that order to the uint8 batch on
    the device (flip_batch); host flags cost no device sync. photometric: the
    batch's rows of augment.photometric_params (colour maps folded into the normalisation, then blur), or None.
    out: on the CPU, (x, y) tensors of the right shapes to write into (reused buffers spare the page faults of
    ~100 MB of fresh memory per batch; see new_outputs).
    """
    device = torch.device(device)
    flipping = flips is not None
    # copy=True keeps the caller's batch intact when device is the CPU and the flips below work in place.
    images = images_u8.to(device, non_blocking=True, copy=flipping)
    masks = masks_u8.to(device, non_blocking=True, copy=flipping)
    if flipping:
        flip_batch(images, masks, torch.as_tensor(flips).cpu().bool().reshape(len(images), 3))
    into = out is not None and device.type == "cpu" and channels_last
    x = _photometric(images, photometric, out[0] if into else None)
    if into:
        return x, out[1].copy_(masks)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()
    return x, masks.long()


def _photometric(images, params, out):
    """Normalised floats of a uint8 NHWC batch, with its photometric distortion when params (B, 5) is given."""
    if params is None:
        return normalize(images, out)
    params = np.asarray(params)
    coloured = (params[:, :SIGMA] != (1, 1, 1, 0)).any()
    x = colour_normalize(images, params, MEAN, STD, out) if coloured else normalize(images, out)
    return blur_(x, params[:, SIGMA])


def new_outputs(images_u8):
    """(x, y) buffers for to_device_batch(out=...) of batches shaped like images_u8 (B, S, S, 3)."""
    return torch.empty(images_u8.shape, dtype=torch.float32), torch.empty(images_u8.shape[:3], dtype=torch.long)


def normalize(images_u8, out=None):
    """uint8 (B,H,W,3) or (B,3,H,W) -> float (B,3,H,W) in ImageNet units; NHWC input stays NHWC in memory.
    out: a float (B,H,W,3) buffer to write into instead of a fresh tensor (NHWC input)."""
    nhwc = images_u8.shape[1] != 3 and images_u8.is_contiguous()
    scale = torch.tensor([1 / (255 * s) for s in STD])
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)])
    x = images_u8.float() if out is None or not nhwc else out.copy_(images_u8)
    if nhwc:
        # One fused multiply-add over rows of W * 3 values with the per-channel factors tiled along them:
        # broadcasting over an innermost dimension of 3 measured six times slower on CPU.
        width = x.shape[2]
        rows = x.view(-1, width * 3)
        torch.addcmul(shift.repeat(width).to(x.device, non_blocking=True), rows,
                      scale.repeat(width).to(x.device, non_blocking=True), out=rows)
        return x.permute(0, 3, 1, 2)
    shape = (1, 3, 1, 1) if images_u8.shape[1] == 3 else (1, 1, 1, 3)
    torch.addcmul(shift.to(x.device, non_blocking=True).view(shape), x,
                  scale.to(x.device, non_blocking=True).view(shape), out=x)
    return x if images_u8.shape[1] == 3 else x.permute(0, 3, 1, 2)


def eval_shard(n, rank, world):
    """Contiguous evaluation indices of one rank; across ranks each of 0..n-1 appears exactly once."""
    return torch.arange(rank * n // world, (rank + 1) * n // world)
