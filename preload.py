"""Resized images and masks shared by a node's processes: one uint8 file in /dev/shm, or decoded on access.

Local rank 0 decodes and resizes once; every local rank and loader thread maps the same bytes. Files of runs
that died are reclaimed by the next preload on the node; files with a live user are never touched.
"""
import atexit
import collections
import concurrent.futures
import errno
import fcntl
import hashlib
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from files import open_image, read_mask, rgb_array
from labels import UserError

# Offline augmentation rows per sample: the prototype's "3x" means three copies (hflip, vflip, rot90)
# next to the original, so each training image becomes 4 rows.
OFFLINE_COPIES = (lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1], np.rot90)


def load_resized(sample, size):
    """(image uint8 (S,S,3), mask uint8 (S,S)): area-like bilinear for the image, nearest for the mask."""
    image = open_image(sample.image)
    mask = read_mask(sample.mask, image_size=(image.height, image.width))
    pixels = rgb_array(image, sample.image)
    # Pillow's bilinear widens its kernel when shrinking (an area-like filter); reducing_gap first box-reduces
    # very large images by an integer factor, which keeps 200+ MP sources fast.
    small = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    small_mask = Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(small), np.asarray(small_mask)


def _fill(samples, size, images, masks, copies):
    def one(i):
        image, mask = load_resized(samples[i], size)
        for j in range(copies):
            images[i * copies + j] = OFFLINE_COPIES[j](image)
            masks[i * copies + j] = OFFLINE_COPIES[j](mask)

    with concurrent.futures.ThreadPoolExecutor(cores()) as pool:
        list(pool.map(one, range(len(samples))))


def cores():
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _shm_dir():
    return Path(os.environ.get("ARTDAMAGE_SHM_DIR", "/dev/shm"))


def _start_time(pid):
    """Kernel start time of pid (jiffies since boot), or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_namespace():
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _me():
    return f"{_pid_namespace()}-{os.getpid()}-{_start_time(os.getpid())}"


def _alive(tag):
    """tag is 'pidnamespace-pid-starttime' (see _me). The start time keeps a recycled pid from passing as the
    old process; a process of another pid namespace (a container sharing /dev/shm) cannot be checked and
    counts as alive, so its files are never removed."""
    namespace, _, rest = tag.partition("-")
    pid, _, start = rest.partition("-")
    if namespace != str(_pid_namespace()):
        return True
    return pid.isdigit() and _start_time(int(pid)) == start


class _Lock:
    """Node-wide lock over the preload files; flock is released by the kernel when its holder dies."""

    def __init__(self, directory):
        self.path = directory / "artdamage.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)


def _key_files(directory, key):
    return {"data": directory / f"artdamage-{key}.u8", "users": directory / f"artdamage-{key}.users",
            "failed": directory / f"artdamage-{key}.failed"}


def _unlink(path):
    try:
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass  # another user's file on a shared /dev/shm (sticky bit), or a users/ directory that is not empty


def _reclaim(directory, keep_key):
    """Removes preload files of runs whose processes are all dead; call under _Lock.

    keep_key's finished array is left for the caller to adopt (a cache hit after a crash).
    """
    keys = {}
    for path in directory.glob("artdamage-*"):
        keys.setdefault(path.name[len("artdamage-"):].split(".")[0], []).append(path)
    for key, paths in keys.items():
        live = False
        for path in paths:
            if path.name.endswith(".users"):
                for user in list(path.iterdir()):
                    if _alive(user.name):
                        live = True
                    else:
                        _unlink(user)
            elif path.name.endswith(".tmp"):
                if _alive(path.name.split(".")[1]):
                    live = True
                else:
                    _unlink(path)
        if not live:
            files = _key_files(directory, key)
            if key != keep_key:
                _unlink(files["data"])
            _unlink(files["failed"])
            _unlink(files["users"])


_registered = collections.Counter()


class Preloaded:
    """Resized images (N,S,S,3) and masks (N,S,S) uint8 in one /dev/shm file shared by a node's processes.

    Each process registers a pid file in artdamage-KEY.users/; close() (also run at exit) unregisters
    it and the last user removes the file. Files of runs that died (SIGKILL, OOM) are reclaimed by the
    next preload on the node; files with a live user are never touched.
    """

    def __init__(self, samples, size, local_rank=0, local_world=1, offline_aug=False, timeout=3600.0):
        self.size, self.copies = size, len(OFFLINE_COPIES) if offline_aug else 1
        self.ids = [s.id for s in samples for _ in range(self.copies)]
        self.directory, self.key = _shm_dir(), _cache_key(samples, size, offline_aug)
        if not self.directory.is_dir():
            raise UserError(f"{self.directory}: no shared-memory folder; use --preload none, or point "
                            "ARTDAMAGE_SHM_DIR at a tmpfs folder")
        self.files = _key_files(self.directory, self.key)
        self.path, self._owner, self._closed = self.files["data"], os.getpid(), False
        n = len(self.ids)
        self._shape = ((n, size, size, 3), (n, size, size))
        self.nbytes = n * size * size * 4
        with _Lock(self.directory):
            _reclaim(self.directory, self.key)
            self._register()
        atexit.register(self.close)
        try:
            self._map(samples, local_rank, local_world, timeout)
        except BaseException:
            self.close()
            raise

    def _register(self):
        self.files["users"].mkdir(exist_ok=True)
        (self.files["users"] / _me()).touch()
        _registered[self.path] += 1

    def _map(self, samples, local_rank, local_world, timeout):
        deadline = time.monotonic() + timeout
        while True:
            with _Lock(self.directory):
                if self.files["data"].is_file():
                    break
                if self.files["failed"].is_file():
                    raise UserError(self.files["failed"].read_text())
                building = list(self.directory.glob(f"artdamage-{self.key}.*.tmp"))
                orphaned = [tmp for tmp in building if not _alive(tmp.name.split(".")[1])]
                for tmp in orphaned:
                    _unlink(tmp)
                # Rank 0 builds; if a builder died mid-way, whoever notices takes over.
                build = len(building) == len(orphaned) and (local_rank == 0 or local_world == 1 or orphaned)
                if build:
                    tmp = self.directory / f"artdamage-{self.key}.{_me()}.tmp"
                    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            if build:
                self._build(samples, tmp, fd)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path}: local rank 0 did not finish preloading within {timeout:.0f} s; "
                                   "check that rank 0 is alive, or use --preload none")
            time.sleep(0.05)
        if self.path.stat().st_size != self.nbytes:
            raise RuntimeError(f"{self.path}: size {self.path.stat().st_size} differs from the expected "
                               f"{self.nbytes} bytes; delete it")
        self.images = np.memmap(self.path, np.uint8, "r", 0, self._shape[0])
        self.masks = np.memmap(self.path, np.uint8, "r", self.nbytes // 4 * 3, self._shape[1])

    def _build(self, samples, tmp, fd):
        try:
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EFBIG):
                    raise
                free = os.statvfs(self.directory)
                raise UserError(f"{self.directory}: preload needs {self.nbytes / 2**30:.2f} GiB, "
                                f"{free.f_bavail * free.f_frsize / 2**30:.2f} GiB free; use --preload none, "
                                "a smaller --img-size, or a larger /dev/shm") from None
            images = np.memmap(tmp, np.uint8, "r+", 0, self._shape[0])
            masks = np.memmap(tmp, np.uint8, "r+", self.nbytes // 4 * 3, self._shape[1])
            _fill(samples, self.size, images, masks, self.copies)
            del images, masks
            os.rename(tmp, self.path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, UserError):
                self.files["failed"].write_text(str(exc))
            raise
        finally:
            os.close(fd)

    def __len__(self):
        return len(self.ids)

    def gather(self, indices, images, masks):
        # mode="clip" avoids numpy's extra buffer for out=; batches() has checked the bounds.
        np.take(self.images, indices, axis=0, out=images, mode="clip")
        np.take(self.masks, indices, axis=0, out=masks, mode="clip")

    def close(self):
        """Unregisters this process; the last user on the node removes the shared file. Idempotent."""
        if self._closed or os.getpid() != self._owner:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.images = self.masks = None
        with _Lock(self.directory):
            _registered[self.path] -= 1
            if _registered[self.path] > 0:
                return
            del _registered[self.path]
            (self.files["users"] / _me()).unlink(missing_ok=True)
            _reclaim(self.directory, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cache_key(samples, size, offline_aug):
    digest = hashlib.sha256(f"v1 {size} {bool(offline_aug)}".encode())
    for sample in samples:
        for path in (sample.image, sample.mask):
            try:
                stat = os.stat(path)
            except OSError as exc:
                raise UserError(f"{path}: cannot read ({exc.strerror}); check the dataset folder") from None
            digest.update(f"\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


class _Lazy:
    """Sequence of images or masks decoded and resized from disk on access (the --preload none path)."""

    def __init__(self, owner, part):
        self.owner, self.part = owner, part

    def __len__(self):
        return len(self.owner.ids)

    def __getitem__(self, row):
        return self.owner.row(row)[self.part]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class OnDisk:
    """Same interface as Preloaded, but every access decodes and resizes from disk (slow, no RAM cost)."""

    def __init__(self, samples, size, offline_aug=False):
        self.samples, self.size = samples, size
        self.copies = len(OFFLINE_COPIES) if offline_aug else 1
        self.ids = [s.id for s in samples for _ in range(self.copies)]
        self.images, self.masks = _Lazy(self, 0), _Lazy(self, 1)
        self._pool = None

    def __len__(self):
        return len(self.ids)

    def row(self, row):
        image, mask = load_resized(self.samples[row // self.copies], self.size)
        augment = OFFLINE_COPIES[row % self.copies]
        return np.ascontiguousarray(augment(image)), np.ascontiguousarray(augment(mask))

    def gather(self, indices, images, masks):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(cores())
        for j, (image, mask) in enumerate(self._pool.map(self.row, indices.tolist())):
            images[j], masks[j] = image, mask

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def preload(samples, size, local_rank=0, local_world=1, offline_aug=False, mode="shm", timeout=3600.0):
    """Samples resized to size x size: mode "shm" builds/maps the node-shared array (Preloaded), "disk"
    reads on access (OnDisk). offline_aug adds hflip, vflip and rot90 copies: pass it for training
    samples only, after the split. Local rank 0 builds; other local ranks wait up to timeout seconds."""
    if mode == "disk" or not samples:
        return OnDisk(samples, size, offline_aug)
    if mode != "shm":
        raise ValueError(f"preload mode {mode!r}: use 'shm' or 'disk'")
    return Preloaded(samples, size, local_rank, local_world, offline_aug, timeout)
