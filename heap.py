"""glibc's malloc told to keep the memory a CPU training step frees, so the next step reuses mapped pages.

By default glibc maps a large block on its own and unmaps it when freed, and gives the top of its heap back to
the kernel, by thresholds it adapts as it goes: in some processes every training step then faults its
activations in again as fresh zeroed pages (a MiT-B3 UNet at 128 px, batch 4: 20-60 thousand minor faults a
step). Kept, such a step is 6 % faster (ConvNeXt-T at 256 px 9-12 %, BENCHMARKS.md); where glibc had settled by
itself, 0-4 % slower, within this VM's noise. Resident memory stays at the steps' peak instead of shrinking
between them, and blocks freed mid-heap are reused once glibc's aligned requests fit them, so it settles a few
steps in (the demo's ranks peak 13-20 MB higher, of about 1 GB). GPU runs and predict.py are left as they are.
"""
import ctypes
import os

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# mallopt takes a C int: the largest trim threshold it can be given (2 GiB of free heap top before a trim).
INT_MAX = 2**31 - 1


def keep_freed_memory(device):
    """On a CPU device, serves every block from the heap (no block mapped on its own) and never trims it;
    returns whether it did: False on a GPU (its steps' memory is the CUDA allocator's) and off glibc, where
    nothing changes."""
    if device.type != "cpu":
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, INT_MAX)))
