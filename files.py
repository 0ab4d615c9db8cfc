"""A dataset folder on disk: image/mask pairs, its label scheme, reading images, id masks and metadata; writes
that cannot corrupt.

Layout: images/ID.{png,jpg,jpeg,tif,tiff} + annotations/ID.png with matching ids, optional metadata.csv
(id, material, content, ...), optional classes.json (the label scheme; ARTeFACT's when absent, with a note).
Every problem a user can cause is a UserError naming the file; every write that meets a full disk, a read-only
file system or a denied permission says so in one line naming the folder.
"""
import collections
import contextlib
import csv
import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from labels import (ARTEFACT_SOURCE, UserError, artefact_scheme, hex_colour, note, read_scheme, scheme_summary,
                    scheme_to_dict)
from strips import exif_orientation, nearest_positions, strip_reducer, strip_resizer, upright_strips

# ARTeFACT's largest images are ~244 MP (its dataset card raises the limit likewise); Pillow warns above
# this and refuses above twice this, which still guards against decompression bombs.
Image.MAX_IMAGE_PIXELS = 300_000_000

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg")

Sample = collections.namedtuple("Sample", "id image mask")
SCHEME_FILE = "classes.json"


# OSErrors a user fixes (space, mounts, permissions), as the words of their one line; any other errno is a bug.
WRITE_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def size_text(nbytes):
    """A size for a person: GiB from 1 GiB up, then MiB, KiB below 1 MiB (a 40 MB preload must not read
    "0.00 GiB")."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def free_bytes(folder):
    """Bytes free to this user in folder's file system (the nearest existing folder above it)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def write_error(path, exc, needed=None, fix=None):
    """The one-line UserError for an OSError met writing path (full disk with the space needed and free,
    read-only file system, permission denied), naming the folder; None for any other error."""
    what = WRITE_ERRORS.get(getattr(exc, "errno", None))
    if what is None:
        return None
    path = Path(path)
    if exc.errno in FULL:
        space = f"needs {size_text(needed)}, " if needed else ""
        return UserError(f"{path.parent}: {what} writing {path.name} ({space}{size_text(free_bytes(path.parent))} "
                         f"free); {fix or 'free space and run again'}")
    return UserError(f"{path.parent}: {what} writing {path.name}; "
                     f"{fix or 'make the folder writable or pass another one'}")


def _unlink_quietly(path):
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def atomic_write(path, write, needed=None, fix=None):
    """write(temporary path) then rename over path, so a kill mid-write leaves the previous file intact; a full
    disk, read-only file system or denied permission is a UserError (see write_error; needed: bytes the
    file needs, for the message).

    The temporary name carries this process's id (see remove_stale_temporaries); whatever stands there is
    removed first, so a planted symlink is never written through, and rename replaces a link at path itself.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        error = write_error(path, exc, needed, fix)
        if error is None:
            raise
        raise error from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def append_line(path, line, fix=None):
    """Appends one line whole: a single os.write on an O_APPEND descriptor, then fsync. A write the disk cut
    short is truncated back, so a full disk never leaves half a line (a kill mid-write still could: read_jsonl
    drops a torn last line)."""
    payload = (line.rstrip("\n") + "\n").encode()
    fd = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        start = os.fstat(fd).st_size
        try:
            if os.write(fd, payload) != len(payload):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    except OSError as exc:
        error = write_error(path, exc, len(payload), fix)
        if error is None:
            raise
        raise error from None
    finally:
        if fd is not None:
            os.close(fd)


def read_jsonl(path):
    """The records of a JSON-lines file. A torn last line (a write cut short by a kill or an older full-disk
    failure) is dropped with a note on stderr; a broken line before it is a UserError naming its number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or exc}); restore it or start a "
                        "fresh run folder") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if any(rest.strip() for rest in lines[number:]):
                raise UserError(f"{path}: line {number} is not JSON; restore the file or remove that line") from None
            print(f"note: {path}: dropped its torn last line {number} ({len(line)} characters, a write cut short)",
                  file=sys.stderr, flush=True)
    return records


def remove_stale_temporaries(folder):
    """Removes atomic_write's temporary files in folder whose writing process is gone (killed mid-write)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)


def _stems(folder):
    files, others = {}, {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            others.setdefault(path.stem, path)
        elif path.stem in files:
            raise UserError(f"{path}: a second file for id {path.stem!r} (also {files[path.stem].name}); keep one")
        else:
            files[path.stem] = path
    return files, others


# prepare.py writes this file before its first image and removes it after metadata.csv: while it is there, the
# folder holds a partial dataset, which list_samples (every reader: checks, training, weights) refuses.
INGEST_MARKER = ".ingest-incomplete"


def list_samples(root):
    """Sorted image/mask pairs of a dataset folder; any unpaired or unusable file is a UserError."""
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "annotations"
    if (root / INGEST_MARKER).exists():
        raise UserError(f"{root}: an ingest into it did not finish ({INGEST_MARKER} is there); rerun `python "
                        f"prepare.py ingest --overwrite --out {root}` with the same shards")
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder not found; a dataset needs images/ and annotations/ "
                            "with matching file names")
    try:
        (images, other_images), (masks, other_masks) = _stems(image_dir), _stems(mask_dir)
    except PermissionError as exc:
        raise UserError(f"{exc.filename}: permission denied; make the folder readable") from None
    for stem, path in sorted((other_images | other_masks).items()):
        if stem in images.keys() ^ masks.keys():
            raise UserError(f"{path}: {path.suffix or 'this'} files are not read; convert it to .png")
    if not images and not masks:
        raise UserError(f"{root}: no images in images/ or annotations/ (png, jpg, tif); add image/mask pairs")
    unpaired = sorted(images.keys() - masks.keys())
    if unpaired:
        raise UserError(f"{images[unpaired[0]]}: image has no mask; add {mask_dir / unpaired[0]}.png or remove "
                        f"the image ({len(unpaired)} unpaired images)")
    unpaired = sorted(masks.keys() - images.keys())
    if unpaired:
        raise UserError(f"{masks[unpaired[0]]}: mask has no image; add {image_dir / unpaired[0]}.png or remove "
                        f"the mask ({len(unpaired)} unpaired masks)")
    lossy = [path for path in masks.values() if path.suffix.lower() in LOSSY_SUFFIXES]
    if lossy:
        raise UserError(f"{lossy[0]}: JPEG blurs label ids at edges; save masks losslessly as .png")
    return [Sample(stem, images[stem], masks[stem]) for stem in sorted(images)]


def open_image(path, orient=True):
    """The decoded PIL image, or a UserError naming the file (missing, unreadable, corrupt).

    orient applies the EXIF orientation, so a camera photo comes out as it is displayed and lines up with a
    mask drawn on it; masks are read as stored (orient=False).
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
        if orient:
            ImageOps.exif_transpose(image, in_place=True)
        return image
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable") from None
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; check the dataset folder") from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, zlib.error, struct.error...: all mean unreadable
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable image ({reason}); re-export or remove it") from None


def rgb_array(image, path):
    """uint8 (H, W, 3) pixels of an opened image; 16-bit greyscale is scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        raise UserError(f"{path}: {image.mode} images (32-bit) are not supported; save as 8-bit RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def read_image(path):
    """uint8 (H, W, 3); 16-bit greyscale is scaled to 8 bits."""
    return rgb_array(open_image(path), path)


def _ids_from_colours(path, rgb, scheme):
    """Ids of an RGB mask: its colours through the scheme's palette (the ignore colour -> the ignore id) when every
    colour is in it; else, for a grey mask (R=G=B), the grey values as ids; else a UserError naming the colours."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    colour_to_id = {colour: c for c, colour in enumerate(scheme.colours)} | {scheme.ignore_colour: scheme.ignore}
    found = [(value >> 16, (value >> 8) & 255, value & 255) for value in colours.tolist()]
    unknown = [hex_colour(colour) for colour in found if colour not in colour_to_id]
    if not unknown:
        ids = np.array([colour_to_id[colour] for colour in found], dtype=np.uint8)
        return ids[inverse.reshape(packed.shape)]
    if all(r == g == b for r, g, b in found):
        return rgb[..., 0].copy()
    shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
    raise UserError(f"{path}: colour mask has colours outside the label scheme's palette ({shown}); give the "
                    "dataset's colours in classes.json (--classes) or save class ids as a single-channel PNG")


def _check_labels(path, mask, scheme):
    """The mask as uint8 when every value is a class id of the scheme or its ignore id; never relabelled."""
    # bincount is linear time, which matters for 200+ MP masks; wider integer masks are rare enough for unique.
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if mask.dtype == np.uint8 else np.unique(mask)
    bad = values[(values < 0) | ((values >= scheme.num_classes) & (values != scheme.ignore))]
    if len(bad):
        shown = ", ".join(str(v) for v in bad[:8].tolist()) + (", ..." if len(bad) > 8 else "")
        raise UserError(f"{path}: label values {shown} are not in the label scheme (class ids "
                        f"0-{scheme.num_classes - 1}, ignore {scheme.ignore}); fix or re-export the mask, or describe "
                        "the dataset's classes in classes.json (--classes)")
    return mask.astype(np.uint8, copy=False)


def read_mask(path, scheme, image_size=None):
    """Class ids uint8 (H, W) of the label scheme; image_size is the image's (height, width), as in image.shape[:2].

    L masks are ids. Palette (P) masks are read as their indices, not their colours, because that is how
    id masks with a preview palette are stored. RGB/RGBA masks are read through the scheme's colours (its
    ignore colour -> its ignore id) when all their colours are in it, else, when grey (R=G=B), as ids. 16-bit
    and 32-bit integer masks are accepted only when every value is a valid id, so no value is ever truncated.
    A value or colour outside the scheme, or anything else, is a UserError naming the file.
    """
    image = open_image(path, orient=False)
    if image.mode in ("L", "P"):
        mask = _check_labels(path, np.asarray(image, dtype=np.uint8), scheme)
    elif image.mode in ("RGB", "RGBA"):
        pixels = np.asarray(image)
        if image.mode == "RGBA" and (pixels[..., 3] != 255).any():
            raise UserError(f"{path}: colour mask has transparent pixels; save it without alpha, "
                            "or as a single-channel id PNG")
        mask = _check_labels(path, _ids_from_colours(path, pixels[..., :3], scheme), scheme)
    elif image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        mask = _check_labels(path, np.asarray(image).astype(np.int64), scheme)
    else:
        raise UserError(f"{path}: mask mode {image.mode} is not supported; save class ids as an 8-bit "
                        "single-channel PNG")
    if image_size is not None and tuple(image_size) != mask.shape:
        raise UserError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                        f"{image_size[1]}x{image_size[0]} as displayed (after its EXIF orientation); masks must "
                        "match their image size")
    return mask


def dataset_scheme(root, classes=None, fallback=None):
    """(label scheme, where it came from) of a dataset folder: the --classes FILE, else ROOT/classes.json, else
    fallback (scheme, its name), by default ARTeFACT's, said in a note line: never assumed silently."""
    if classes:
        return read_scheme(classes, f"--classes {classes}"), f"--classes {classes}"
    path = Path(root) / SCHEME_FILE
    if path.is_file():
        return read_scheme(path), str(path)
    scheme, name = fallback or (artefact_scheme(), ARTEFACT_SOURCE)
    note(f"{path} not found; assumed {name}: {scheme_summary(scheme)}. For another dataset write its "
         f"{SCHEME_FILE} or pass --classes FILE (README 'Your own dataset')")
    return scheme, f"{name} (assumed: no {path})"


def write_scheme(root, scheme):
    """ROOT/classes.json (atomically) holding the scheme in the format dataset_scheme reads."""
    path = Path(root) / SCHEME_FILE
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(scheme_to_dict(scheme), indent=1) + "\n"))
    return path


def read_metadata(root):
    """metadata.csv as {id: row dict}; {} when the file does not exist. An Excel export (UTF-8 byte-order mark,
    CRLF line ends) reads like any other; an id on two rows with different values is a UserError naming both."""
    path = Path(root) / "metadata.csv"
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: unreadable metadata ({exc}); fix or delete it") from None
    if rows and "id" not in rows[0][1]:
        raise UserError(f"{path}: no 'id' column; the first line must name the columns (id, material, content)")
    by_id, line_of = {}, {}
    for line, row in rows:
        earlier = by_id.get(row["id"])
        if earlier is not None and earlier != row:
            column = next(c for c in row if earlier.get(c) != row.get(c))
            raise UserError(f"{path}: id {row['id']} is on lines {line_of[row['id']]} and {line} with different "
                            f"{column} ({earlier.get(column)!r} vs {row.get(column)!r}); keep one row per image")
        by_id[row["id"]], line_of[row["id"]] = row, line
    return by_id


def fingerprint(root):
    """A digest of the dataset folder's files (names, sizes, modification times of its image/mask pairs and
    metadata.csv): it changes when an image or mask is replaced, edited, added or removed under the same path,
    without reading gigabytes of pixels (the preload's cache key rests on the same facts)."""
    root = Path(root)
    digest = hashlib.sha256()
    # list_samples first: a folder that is not a dataset is refused in its one line, not by a traceback here.
    pairs = [path for sample in list_samples(root) for path in (sample.image, sample.mask)]
    for path in sorted([*pairs, root / "metadata.csv"]):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def write_metadata(path, rows):
    """metadata.csv with the columns id, material, content, width, height."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("id", "material", "content", "width", "height"))
        writer.writerows(rows)


def displayed_size(path):
    """(height, width) of an image as displayed (after its EXIF orientation), read from its header alone."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = exif_orientation(image) in (5, 6, 7, 8)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; check the dataset folder") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable") from None
    except Exception as exc:  # a header the decoders cannot parse means an unreadable image
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable image ({reason}); re-export or remove it") from None
    return (width, height) if turned else (height, width)


def working_shape(height, width, size, work_size):
    """(height, width) an image is stored and seen at: long side work_size (never enlarged), each side padded
    to at least size so a size x size crop fits; work_size 0 squashes every image to size x size."""
    scaled_h, scaled_w = scaled_shape(height, width, size, work_size)
    return max(size, scaled_h), max(size, scaled_w)


def resize_image(pixels, height, width):
    """Area-like bilinear resize of uint8 (H, W, 3) pixels: Pillow's BILINEAR with reducing_gap 3, which widens
    its kernel when shrinking and first box-reduces very large images by an integer factor (strips.strip_resizer:
    the same result whether the image comes whole or a strip at a time)."""
    if pixels.shape[:2] == (height, width):
        return pixels
    add, finish = strip_resizer(*pixels.shape[:2], height, width)
    add(pixels)
    return finish()


def resize_labels(labels, height, width):
    """Nearest-neighbour resize of a uint8 (H, W) id map (Pillow's NEAREST positions): ids are never blended."""
    if labels.shape == (height, width):
        return labels
    return labels[nearest_positions(height, labels.shape[0])][:, nearest_positions(width, labels.shape[1])]


def scaled_shape(height, width, size, work_size):
    """The working shape before padding: what an image is resized to (work_size 0: size x size)."""
    if not work_size:
        return size, size
    scale = min(1.0, work_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_working(sample, size, work_size, scheme):
    """(image uint8 (h, w, 3), mask uint8 (h, w)) of a sample at its working shape (see working_shape); padding
    is black in the image and the scheme's ignore id in the mask. The image is decoded a strip at a time
    (scaled_copies), so even a 200+ MP image never lies in memory whole."""
    height, width = displayed_size(sample.image)
    mask = read_mask(sample.mask, scheme, image_size=(height, width))
    scaled_h, scaled_w = scaled_shape(height, width, size, work_size)
    pixels = scaled_copies(sample.image, (scaled_h, scaled_w))[0]
    labels = resize_labels(mask, scaled_h, scaled_w)
    padded_h, padded_w = working_shape(height, width, size, work_size)
    if (padded_h, padded_w) != (scaled_h, scaled_w):
        pixels = np.pad(pixels, ((0, padded_h - scaled_h), (0, padded_w - scaled_w), (0, 0)))
        labels = np.pad(labels, ((0, padded_h - scaled_h), (0, padded_w - scaled_w)), constant_values=scheme.ignore)
    return pixels, labels


Header = collections.namedtuple("Header", "height width alpha dpi")
# Resolutions that software writes when nobody measured anything (cameras, screenshots, Pillow's JPEG fallback).
PLACEHOLDER_DPI = {72.0, 96.0}


def image_header(path):
    """Header(height, width as displayed, alpha: whether it has transparency data, dpi: (x, y) dots per inch of
    the displayed image as the file states them (TIFF/JPEG/PNG resolution; Pillow converts per-cm units) or
    None) from the header alone."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = exif_orientation(image) in (5, 6, 7, 8)
            alpha = image.has_transparency_data and not image.mode.startswith("I")
            dpi = image.info.get("dpi")
    except Exception as exc:
        raise _read_error(path, exc) from None
    if dpi is not None:
        dpi = tuple(float(v) for v in dpi)
        dpi = dpi[::-1] if turned else dpi
    return Header(*((width, height) if turned else (height, width)), alpha, dpi)


def _read_error(path, exc):
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{path}: file not found; check the folder")
    if isinstance(exc, PermissionError):
        return UserError(f"{path}: permission denied; make the file readable")
    # Decoders raise OSError, SyntaxError, zlib.error, struct.error, ValueError...: all mean unreadable.
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"{path}: not a readable image ({reason}); re-export or remove it")


def pil_strips(path, orient=True, rows=None):
    """PIL images of consecutive strips of rows rows of the image at path as displayed (orient=False: as stored):
    PNGs are decoded a strip at a time, other files whole by Pillow first (strips.upright_strips). Any decoding
    problem is a UserError naming the file."""
    try:
        with open(path, "rb") as f, Image.open(f) as image:
            yield from upright_strips(path, image, orient, rows)
    except Exception as exc:
        raise _read_error(path, exc) from None


def image_strips(path, orient=True):
    """Consecutive strips of rows, uint8 (n, W, 3) or, for an image with transparency data, (n, W, 4) with its
    alpha last, of the image as displayed (pil_strips)."""
    alpha = image_header(path).alpha
    for strip in pil_strips(path, orient):
        yield np.asarray(strip.convert("RGBA")) if alpha else rgb_array(strip, path)


def mask_strips(path, scheme, image_size, rows):
    """read_mask's class ids a strip of rows rows at a time: single-channel and palette PNG masks are decoded in
    strips, other masks read whole and cut."""
    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
    except Exception as exc:
        raise _read_error(path, exc) from None
    if mode not in ("L", "P"):
        mask = read_mask(path, scheme, image_size)
        yield from (mask[row:row + rows] for row in range(0, len(mask), rows))
        return
    if tuple(image_size) != (height, width):
        raise UserError(f"{path}: mask is {width}x{height} (WxH) but its image is {image_size[1]}x{image_size[0]} as "
                        "displayed (after its EXIF orientation); masks must match their image size")
    for strip in pil_strips(path, orient=False, rows=rows):
        yield _check_labels(path, np.asarray(strip, dtype=np.uint8), scheme)


def scaled_copies(path, shape, reduce_by=None, on_alpha=None):
    """(the image at path as displayed, resized to shape (h, w) exactly as resize_image resizes the whole
    image; the image box-reduced by the integer factor reduce_by (None: none)), decoded once, a strip of rows
    at a time; on_alpha(alpha rows) receives the alpha channel, strip by strip, of an image that has one."""
    height, width = displayed_size(path)
    add_scaled, finish_scaled = strip_resizer(height, width, *shape)
    add_reduced, finish_reduced = strip_reducer((reduce_by, reduce_by)) if reduce_by else (None, None)
    reduced = []
    for strip in image_strips(path):
        if strip.shape[2] == 4 and on_alpha is not None:
            on_alpha(strip[..., 3])
        pixels = strip[..., :3]
        add_scaled(pixels)
        if add_reduced:
            reduced.append(add_reduced(pixels))
    if add_reduced:
        reduced.append(finish_reduced())
    return finish_scaled(), np.concatenate([r for r in reduced if r is not None]) if add_reduced else None
