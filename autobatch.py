"""--batch-size auto: the largest per-rank batch whose training step fits in GPU memory, the same on every rank.

Each rank probes on its own, without collectives (a rank that runs out of memory earlier than another would
otherwise leave collectives unpaired), then the ranks agree once, on the smallest of their results.
"""
import gc

import torch

from distributed import MIN, all_reduce
from labels import UserError

# BatchNorm in training mode refuses one value per channel (a 1x1 map of one sample); two is the least batch.
START = 2
# Headroom for fragmentation and the evaluation pass.
HEADROOM = 0.9
# Messages of allocation failures that do not arrive as torch.OutOfMemoryError (cuDNN and cuBLAS workspaces,
# kernels refusing tensors too large to index): each means "this batch does not fit".
_NO_FIT = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED",
           "canUse32BitIndexMath")


def does_not_fit(exc):
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in _NO_FIT))


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(step, batch):
    """True when step(batch) ran; False when it ran out of memory (any other error propagates)."""
    try:
        step(batch)
        return True
    except RuntimeError as exc:
        if not does_not_fit(exc):
            raise
        return False
    finally:
        _release()


def largest_fitting(step, cap, start=START):
    """The largest batch in start..cap for which step runs (doubling from start, then bisection to within
    1/16), or 0 when start itself does not fit."""
    if cap < start or not fits(step, start):
        return 0
    low, high = start, None
    while high is None:
        candidate = min(low * 2, cap)
        if candidate == low:
            return low
        if fits(step, candidate):
            low = candidate
        else:
            high = candidate
    while high - low > max(1, low // 16):
        mid = (low + high) // 2
        low, high = (mid, high) if fits(step, mid) else (low, mid)
    return low


def rounded(batch):
    """Headroom taken off, and multiples of 8 from 16 up (tensor-core tiles); never below START."""
    batch = int(batch * HEADROOM)
    return max(START, batch // 8 * 8 if batch >= 16 else batch)


def find_batch_size(step, device, cap, world):
    """Global batch: world x the per-rank batch every rank can run, at most cap (the training images per rank).
    step(batch) runs one local training step; it must run no collective."""
    local = largest_fitting(step, cap)
    agreed = int(all_reduce(torch.tensor(local, device=device), MIN))
    if agreed < START:
        raise UserError(f"--batch-size auto: not even {START} images fit one training step on "
                        f"{'every rank' if world > 1 else 'the GPU'}" + (f" (at most {cap} per rank: the training "
                        "images)" if cap < START else "") + "; lower --img-size or use a smaller --encoder")
    return min(rounded(agreed), cap) * world
