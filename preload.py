"""Images and masks at the working scale, shared by a node's processes: one uint8 file in /dev/shm, or decoded
on access (--preload none).

Each row is one image (or an offline-augmented copy) at its own working size (see files.working_shape), stored
back to back with its mask, plus per-row class pixel counts and a few pixel positions of each damage class
(for crops centred on damage). Local rank 0 decodes and resizes once; every local rank and loader thread maps
the same bytes. Files of runs that died are reclaimed by the next preload on the node; files with a live user
are never touched.
"""
import atexit
import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from augment import resize_window, window
from files import displayed_size, load_working, working_shape
from labels import UserError, progress, scheme_to_dict
from writes import free_bytes, size_text, write_error

# Offline augmentation rows per sample: the prototype's "3x" means three copies (hflip, vflip, rot90)
# next to the original, so each training image becomes 4 rows.
OFFLINE_COPIES = (lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1], np.rot90)
# Pixel positions kept per damage class and row: enough to centre crops on varied spots of a rare class.
POINTS = 32
PIXEL = np.dtype("V3")  # one RGB pixel as a unit

Layout = collections.namedtuple("Layout", "shapes image_offsets mask_offsets counts_offset points_offset nbytes")
# What the rows of a set hold: its images at their working scale for crops of size (work_size 0: squashed to
# size x size; else long side work_size, padded to at least size), masks read with the label scheme, and with
# offline_aug each image's hflip, vflip and rot90 copies next to it.
RowFormat = collections.namedtuple("RowFormat", "size scheme work_size offline_aug", defaults=(0, False))


def count_columns(scheme):
    """Columns of the per-row counts: one per class id, then the ignored pixels."""
    return scheme.num_classes + 1


def row_layout(samples, size, work_size, copies, scheme):
    """Every row's working shape and where its bytes lie in the flat buffer."""
    shapes = []
    for sample in samples:
        height, width = working_shape(*displayed_size(sample.image), size, work_size)
        for j in range(copies):
            # rot90 swaps the sides.
            shapes.append((width, height) if j == 3 else (height, width))
    shapes = np.array(shapes, dtype=np.int64).reshape(-1, 2)
    pixels = shapes[:, 0] * shapes[:, 1]
    image_offsets = np.concatenate([[0], np.cumsum(pixels * 3)])
    mask_offsets = image_offsets[-1] + np.concatenate([[0], np.cumsum(pixels)])
    counts_offset = int(mask_offsets[-1] + 7) // 8 * 8
    points_offset = counts_offset + len(shapes) * count_columns(scheme) * 8
    return Layout(shapes, image_offsets[:-1], mask_offsets[:-1], counts_offset, points_offset,
                  points_offset + len(shapes) * scheme.num_classes * POINTS * 2 * 4)


def row_stats(mask, scheme):
    """(pixel counts of each class id, then of the ignore id (C + 1,); up to POINTS (y, x) positions of each
    damage class (C, POINTS, 2), -1 padded, none for the clean class)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    points = np.full((scheme.num_classes, POINTS, 2), -1, dtype=np.int32)
    for c in scheme.damage_ids:
        if not counts[c]:
            continue
        where = np.flatnonzero(mask.ravel() == c)
        chosen = np.sort(np.random.default_rng(int(c)).choice(where, min(POINTS, len(where)), replace=False))
        points[c, :len(chosen)] = np.stack(np.divmod(chosen, mask.shape[1]), axis=1)
    return np.append(counts[:scheme.num_classes], counts[scheme.ignore]).astype(np.int64), points


def _copies_of(form):
    """Rows per sample: the image alone, or with offline_aug also its OFFLINE_COPIES flips."""
    return len(OFFLINE_COPIES) if form.offline_aug else 1


def _fill(samples, form, buffer, layout):
    size, scheme, work_size, _ = form
    copies = _copies_of(form)
    counts = np.ndarray((len(layout.shapes), count_columns(scheme)), np.int64, buffer, layout.counts_offset)
    points = np.ndarray((len(layout.shapes), scheme.num_classes, POINTS, 2), np.int32, buffer, layout.points_offset)
    show, done, lock = progress("preload: images", len(samples)), [0], threading.Lock()
    size_note = f" ({layout.nbytes / 2**20:.0f} MB)"

    def one(i):
        image, mask = load_working(samples[i], size, work_size, scheme)
        for j in range(copies):
            row = i * copies + j
            h, w = layout.shapes[row]
            _image_view(buffer, layout, row)[:] = OFFLINE_COPIES[j](image)
            _mask_view(buffer, layout, row)[:] = OFFLINE_COPIES[j](mask)
            counts[row], points[row] = row_stats(_mask_view(buffer, layout, row), scheme)
        with lock:
            done[0] += 1
            show(done[0], size_note)

    with concurrent.futures.ThreadPoolExecutor(cores()) as pool:
        list(pool.map(one, range(len(samples))))


def _image_view(buffer, layout, row):
    h, w = layout.shapes[row]
    return np.ndarray((h, w, 3), np.uint8, buffer, layout.image_offsets[row])


def _mask_view(buffer, layout, row):
    h, w = layout.shapes[row]
    return np.ndarray((h, w), np.uint8, buffer, layout.mask_offsets[row])


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


class _Rows:
    """What Preloaded and OnDisk share: rows by index, crops of them, per-row class statistics (by the label
    scheme the masks were read with, self.scheme)."""

    def _take_format(self, samples, form):
        self.form, (self.size, self.scheme, self.work_size, _) = form, form
        self.copies = _copies_of(form)
        self.ids = [s.id for s in samples for _ in range(self.copies)]

    def __len__(self):
        return len(self.ids)

    def gather(self, indices, corners, images, masks, flips, sides):
        """Copies each row's square crop at corners[j] = (top, left) into images[j] / masks[j], flipped on the
        way by flips[j] = (hflip, vflip, rot90) in that order: flipped views cost the copy little extra.
        sides[j] is the side of the window cut at corners[j]; a window of another side than the crops' is resized
        to theirs (augment.resize_window), and off the row its image is 0, its mask the scheme's ignore id."""
        size = images.shape[1]
        scratch = np.empty_like(images[0]), np.empty_like(masks[0])
        for j, (row, (top, left), turn, side) in enumerate(zip(indices.tolist(), corners.tolist(), flips.tolist(),
                                                               sides.tolist())):
            turned = any(turn)
            if side == size:
                image = self.image(row)[top:top + size, left:left + size]
                mask = self.mask(row)[top:top + size, left:left + size]
                if turned:
                    # Read backwards or down its columns, a crop of the shared buffer misses the cache at every
                    # pixel: a straight copy first, then the flip from that cached copy (1.4x faster a batch).
                    scratch[0][...], scratch[1][...] = image, mask
                    image, mask = scratch
                _copy_pixels(images[j], image, turn)
            else:
                image, mask = resize_window(window(self.image(row), top, left, side, 0),
                                            window(self.mask(row), top, left, side, self.scheme.ignore), size,
                                            scratch[0] if turned else images[j])
                if turned:
                    _copy_pixels(images[j], image, turn)
            masks[j] = _flipped(mask, turn)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _flipped(array, turn):
    """A view of array (rows, columns, ...) flipped left-right, then upside down, then turned by 90 degrees
    counter-clockwise, as turn = (hflip, vflip, rot90) says."""
    hflip, vflip, rot = turn
    array = array[:, ::-1] if hflip else array
    array = array[::-1] if vflip else array
    return np.rot90(array) if rot else array


def _copy_pixels(target, image, turn):
    """target[...] = _flipped(image, turn) for (h, w, 3) uint8 arrays, by the fastest copy numpy has for it:
    turned, as whole 3-byte pixels; mirrored, one channel at a time (2.6x and 4x faster than byte by byte)."""
    if turn[2]:
        target.view(PIXEL)[..., 0] = _flipped(image.view(PIXEL)[..., 0], turn)
    elif turn[0]:
        for c in range(3):
            target[..., c] = _flipped(image[..., c], turn)
    else:
        target[...] = _flipped(image, turn)


class Preloaded(_Rows):
    """Rows at their working size, back to back in one /dev/shm file shared by a node's processes.

    Each process registers a pid file in artdamage-KEY.users/; close() (also run at exit) unregisters
    it and the last user removes the file. Files of runs that died (SIGKILL, OOM) are reclaimed by the
    next preload on the node; files with a live user are never touched.
    """

    def __init__(self, samples, form, node=(0, 1), timeout=3600.0):
        self._take_format(samples, form)
        self.directory, self.key = _shm_dir(), _cache_key(samples, form)
        if not self.directory.is_dir():
            raise UserError(f"{self.directory}: no shared-memory folder; use --preload none, or point "
                            "ARTDAMAGE_SHM_DIR at a tmpfs folder")
        self.layout = row_layout(samples, self.size, self.work_size, self.copies, self.scheme)
        self.shapes, self.nbytes = self.layout.shapes, self.layout.nbytes
        self.files = _key_files(self.directory, self.key)
        self.path, self._owner, self._closed = self.files["data"], os.getpid(), False
        try:
            with _Lock(self.directory):
                _reclaim(self.directory, self.key)
                self._register()
        except OSError as exc:
            raise _shm_error(self.directory, exc) from None
        atexit.register(self.close)
        try:
            self._map(samples, node, timeout)
        except OSError as exc:
            self.close()
            raise _shm_error(self.directory, exc, self.nbytes) from None
        except BaseException:
            self.close()
            raise

    def _register(self):
        self.files["users"].mkdir(exist_ok=True)
        (self.files["users"] / _me()).touch()
        _registered[self.path] += 1

    def _map(self, samples, node, timeout):
        local_rank, local_world = node
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
        self.buffer = np.memmap(self.path, np.uint8, "r")
        n = len(self.ids)
        self.counts = np.ndarray((n, count_columns(self.scheme)), np.int64, self.buffer, self.layout.counts_offset)
        self.points = np.ndarray((n, self.scheme.num_classes, POINTS, 2), np.int32, self.buffer,
                                 self.layout.points_offset)

    def image(self, row):
        """uint8 (h, w, 3) view of a row's image at its working size."""
        return _image_view(self.buffer, self.layout, row)

    def mask(self, row):
        """uint8 (h, w) view of a row's mask (the ignore id outside the object and in the padding)."""
        return _mask_view(self.buffer, self.layout, row)

    def _build(self, samples, tmp, fd):
        try:
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EFBIG):
                    raise
                raise UserError(f"{self.directory}: preload needs {size_text(self.nbytes)}, "
                                f"{size_text(free_bytes(self.directory))} free; use --preload none, a smaller "
                                "--work-size, or a larger /dev/shm") from None
            buffer = np.memmap(tmp, np.uint8, "r+")
            _fill(samples, self.form, buffer, self.layout)
            buffer.flush()
            del buffer
            os.rename(tmp, self.path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, UserError):
                # Waiting ranks read the builder's error from here; a full folder leaves them their timeout.
                with contextlib.suppress(OSError):
                    self.files["failed"].write_text(str(exc))
            raise
        finally:
            os.close(fd)

    def close(self):
        """Unregisters this process; the last user on the node removes the shared file. Idempotent."""
        if self._closed or os.getpid() != self._owner:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.buffer = self.counts = self.points = None
        with _Lock(self.directory):
            _registered[self.path] -= 1
            if _registered[self.path] > 0:
                return
            del _registered[self.path]
            (self.files["users"] / _me()).unlink(missing_ok=True)
            _reclaim(self.directory, None)


def _shm_error(directory, exc, needed=None):
    """The one line for a shared-memory folder that is read-only, full or denied; other errors are bugs."""
    fix = f"use --preload none, or point ARTDAMAGE_SHM_DIR at a writable tmpfs folder (now {directory})"
    error = write_error(Path(exc.filename) if exc.filename else directory / "artdamage.lock", exc, needed, fix)
    if error is None:
        raise exc
    return error


def _cache_key(samples, form):
    size, scheme, work_size, offline_aug = form
    # The scheme decides how masks are read (ids, palette) and the count columns: another scheme, another file.
    scheme_json = json.dumps(scheme_to_dict(scheme), sort_keys=True)
    digest = hashlib.sha256(f"v3 {size} {work_size} {bool(offline_aug)} {scheme_json}".encode())
    for sample in samples:
        for path in (sample.image, sample.mask):
            try:
                stat = os.stat(path)
            except OSError as exc:
                raise UserError(f"{path}: cannot read ({exc.strerror}); check the dataset folder") from None
            digest.update(f"\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


class OnDisk(_Rows):
    """Same interface as Preloaded, but every access decodes and resizes from disk (slow, no RAM cost); the
    per-row class statistics are worked out once, on first use, from the masks alone."""

    def __init__(self, samples, form):
        self.samples = samples
        self._take_format(samples, form)
        self.shapes = row_layout(samples, self.size, self.work_size, self.copies, self.scheme).shapes
        self._stats = None

    def _row(self, row):
        image, mask = load_working(self.samples[row // self.copies], self.size, self.work_size, self.scheme)
        augment = OFFLINE_COPIES[row % self.copies]
        return np.ascontiguousarray(augment(image)), np.ascontiguousarray(augment(mask))

    def image(self, row):
        return self._row(row)[0]

    def mask(self, row):
        return self._row(row)[1]

    def _statistics(self):
        if self._stats is None:
            stats = [row_stats(self.mask(row), self.scheme) for row in range(len(self.ids))]
            self._stats = (np.array([c for c, _ in stats]).reshape(-1, count_columns(self.scheme)),
                           np.array([p for _, p in stats]).reshape(-1, self.scheme.num_classes, POINTS, 2))
        return self._stats

    @property
    def counts(self):
        return self._statistics()[0]

    @property
    def points(self):
        return self._statistics()[1]

    def close(self):
        pass


def preload(samples, form, mode="shm", node=(0, 1), timeout=3600.0):
    """The samples' rows in the RowFormat form: mode "shm" builds/maps the node-shared file (Preloaded), "disk"
    reads on access (OnDisk). Pass form.offline_aug for training samples only, after the split. Of the
    node = (local rank, local world size)'s processes, local rank 0 builds; the others wait up to timeout
    seconds."""
    if mode == "disk" or not samples:
        return OnDisk(samples, form)
    if mode != "shm":
        raise ValueError(f"preload mode {mode!r}: use 'shm' or 'disk'")
    return Preloaded(samples, form, node, timeout)
