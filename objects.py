"""Where the object is in a photograph predict.py maps, a strip of rows at a time: an --object mask (black
outside, any one other value on the object), else the image's own alpha channel (fully transparent = outside),
else the --truth mask's ignore id, else the whole image; and the masks named like an image in a folder."""
import contextlib
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from files import mask_strips, pil_strips
from labels import UserError

OBJECT_RULE = "black (0) outside the object and one other value (e.g. white) on it"
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".webp")


def find_mask(folder, image_path, flag):
    """The mask in folder named like the image (any lossless suffix), or a UserError naming the flag."""
    for suffix in MASK_SUFFIXES:
        candidate = Path(folder) / (image_path.stem + suffix)
        if candidate.is_file():
            return candidate
    raise UserError(f"{flag} {folder}: no mask named {image_path.stem}.png for {image_path}; add it or drop {flag}")


def _stored_size(path):
    try:
        with Image.open(path) as image:
            return image.size[::-1]
    except Exception:
        # Unreadable: the strips name the problem when they are read.
        return None


def object_strips(path, image_size, rows):
    """Consecutive bool strips (True on the object) of an object mask, read as stored in greyscale (Pillow's L
    conversion of any mode; alpha is not read): 0 is outside, the one other value the object. A mask of another
    size than its image (image_size: (height, width) as displayed), with more than two values, with two values
    neither of which is 0, or without any object pixel, is a UserError naming it."""
    size = _stored_size(path)
    if size is not None and tuple(size) != tuple(image_size):
        raise UserError(f"{path}: object mask is {size[1]}x{size[0]} (WxH) but its image is {image_size[1]}x"
                        f"{image_size[0]} as displayed; save the mask at the image's size")
    values = set()
    for strip in pil_strips(path, orient=False, rows=rows):
        grey = np.asarray(strip.convert("L"))
        values |= set(np.flatnonzero(np.bincount(grey.ravel(), minlength=256)).tolist())
        if len(values) > 2 or (len(values) == 2 and 0 not in values):
            shown = ", ".join(map(str, sorted(values)[:6])) + (", ..." if len(values) > 6 else "")
            raise UserError(f"{path}: an object mask holds {OBJECT_RULE}, this one the grey values {shown}; save "
                            "it with two values (or pass it as --truth if it holds class ids)")
        yield grey != 0
    if values == {0}:
        raise UserError(f"{path}: object mask is black everywhere, so there is no object to measure; an object "
                        f"mask holds {OBJECT_RULE}")


@contextlib.contextmanager
def alpha_on_disk(folder, width):
    """(keep(alpha rows), strips(rows) -> bool strips, True where alpha > 0): an image's alpha channel kept in an
    unnamed temporary file in folder (one byte a pixel) between reading the image and writing its maps."""
    with tempfile.TemporaryFile(dir=folder) as f:
        def keep(alpha):
            f.write((alpha > 0).tobytes())

        def strips(rows):
            f.seek(0)
            while data := f.read(rows * width):
                yield np.frombuffer(data, dtype=bool).reshape(-1, width)
        yield keep, strips


def object_and_truth(source, scheme, size, rows, alpha_strips=None):
    """Consecutive (inside: bool strip or None for all, truth: id strip or None) pairs of rows rows for an image
    of size (height, width): source holds the --object and --truth paths (None where not given); the object is
    the --object mask, else the alpha channel (alpha_strips), else the truth's non-ignore pixels, else all."""
    truths = mask_strips(source["truth"], scheme, size, rows) if source["truth"] else None
    if source["object"]:
        insides = object_strips(source["object"], size, rows)
    elif alpha_strips is not None:
        insides = alpha_strips(rows)
    else:
        insides = None
    for _ in range(0, size[0], rows):
        truth = next(truths) if truths is not None else None
        inside = next(insides) if insides is not None else None
        if inside is None and truth is not None:
            inside = truth != scheme.ignore
        yield inside, truth
    # Let the object mask finish its checks (a mask black everywhere is refused at its end).
    if insides is not None:
        for _ in insides:
            pass


def object_source(source, alpha, scheme):
    """In words, what defined the object of an image (the report's object_source)."""
    if source["object"]:
        return f"--object {source['object']}"
    if alpha:
        return "alpha channel (transparent = outside)"
    if source["truth"]:
        return f"--truth {source['truth']} (id {scheme.ignore} = outside)"
    return "whole image"
