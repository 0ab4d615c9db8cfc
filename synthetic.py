"""The built-in synthetic damage set: procedurally painted artworks with damage masks in ARTeFACT's label scheme.

Written in the dataset folder format (images/, annotations/, metadata.csv, classes.json) so every other script
treats it like ARTeFACT; `train.py --data synthetic` generates it once through data.resolve_data. Each painter
draws one of ARTeFACT's damage classes, so the set is ARTeFACT's scheme by construction.
"""
import csv
import os
import pathlib
import shutil
import uuid

import numpy as np
from PIL import Image, ImageDraw

from canvas import apply_material, artwork, jitter, noise
from files import SCHEME_FILE, write_metadata, write_scheme
from labels import UserError, artefact_scheme, progress
from painters import PAINTERS

SYNTHETIC_MATERIALS = ("Paper", "Canvas", "Tesserae", "Parchment")
SYNTHETIC_CONTENTS = ("Artistic depiction", "Geometric patterns", "Line art")
# Painting order: broad optical/deposit layers first so that opaque additions and thin marks stay on top.
_DAMAGE_ORDER = (15, 10, 7, 6, 14, 1, 2, 12, 11, 9, 8, 4, 5, 3, 13)
# Random extra damage types per image beyond the two scheduled ones; tuned so Clean is ~87 % of labelled pixels.
_EXTRA_DAMAGE = (0, 0, 1)


def _outline(rng, size, yy, xx):
    """Where a photographed artwork lies on its backdrop: a slightly skewed quadrilateral.

    Returns (inside bool (S,S), box for placing damage inside it, backdrop RGB (S,S,3)).
    """
    margins = rng.uniform(0.05, 0.15, 4) * size
    skew = rng.uniform(-0.025, 0.025, (4, 2)) * size
    corners = np.array([[margins[0], margins[1]], [size - margins[2], margins[1]],
                        [size - margins[2], size - margins[3]], [margins[0], size - margins[3]]]) + skew
    layer = Image.new("L", (size, size), 0)
    ImageDraw.Draw(layer).polygon([tuple(p) for p in corners], fill=255)
    inside = np.asarray(layer) > 127
    backdrops = ((0.1, 0.1, 0.11), (0.45, 0.45, 0.45), (0.8, 0.79, 0.76), (0.25, 0.27, 0.3))
    colour = jitter(rng, backdrops[rng.integers(len(backdrops))], 0.02)
    light = 0.85 + 0.15 * (1 - np.hypot(yy - size / 2, xx - size / 2) / size)
    backdrop = (light * (0.96 + 0.08 * noise(rng, size, size // 4)))[..., None] * colour
    inset = 0.05 * size
    box = (margins[1] + inset, margins[0] + inset, size - margins[3] - inset, size - margins[2] - inset)
    return inside, tuple(float(v) for v in box), backdrop


def _render(index, size, seed):
    """One synthetic sample: (image uint8 (S,S,3), mask uint8 (S,S), material, content)."""
    rng = np.random.default_rng(seed * 1000 + index)
    material = SYNTHETIC_MATERIALS[index % len(SYNTHETIC_MATERIALS)]
    content = SYNTHETIC_CONTENTS[(index // len(SYNTHETIC_MATERIALS)) % len(SYNTHETIC_CONTENTS)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = artwork(rng, size, content).astype(np.float32)
    apply_material(rng, img, material, yy, xx)
    mask = np.zeros((size, size), np.uint8)
    photographed = (index + seed) % 3 == 1
    box = (0.0, 0.0, float(size), float(size))
    if photographed:
        inside, box, backdrop = _outline(rng, size, yy, xx)
    # Two scheduled damage types per image (offsets vary by block so pairs do not always co-occur)
    # give every class ~2 images in 15; a random extra adds variety.
    kinds = len(PAINTERS)
    first = (index + seed) % kinds
    second = (first + 3 + 5 * ((index // kinds) % 3)) % kinds
    chosen = {1 + first, 1 + second}
    others = [c for c in sorted(PAINTERS) if c not in chosen]
    chosen.update(rng.choice(others, size=_EXTRA_DAMAGE[rng.integers(len(_EXTRA_DAMAGE))], replace=False).tolist())
    ctx = {"yy": yy, "xx": xx, "size": size, "box": box}
    for label in _DAMAGE_ORDER:
        if label in chosen:
            PAINTERS[label](rng, img, mask, ctx)
    np.clip(img, 0, 1, out=img)
    if photographed:
        img[~inside] = backdrop[~inside]
        mask[~inside] = artefact_scheme().ignore
    img *= (1.0 + rng.normal(0, 0.015, img.shape)).astype(np.float32)
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, mask, material, content


def _complete(root, count, size):
    """True if root holds a finished set of count images of size px; raise if it holds anything else."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        if root.exists() and any(root.iterdir()):
            raise UserError(f"{root} exists but is not a finished synthetic set; delete it or pass another directory")
        return False
    with open(meta, newline="") as f:
        shapes = [(row["width"], row["height"]) for row in csv.DictReader(f)]
    if len(shapes) != count or any(shape != (str(size), str(size)) for shape in shapes):
        raise UserError(f"{root} holds a different synthetic set than {count} images of {size} px; "
                        "delete it or pass another directory")
    return True


def make_synthetic(root, count=64, size=128, seed=42):
    """Write a deterministic synthetic damage set (images/, annotations/, metadata.csv) to root, once.

    Built in a private temporary directory and renamed into place, so concurrent callers
    (e.g. several ranks) never see a partial set; whoever renames second discards its copy.
    """
    root = pathlib.Path(root)
    if _complete(root, count, size):
        if not (root / SCHEME_FILE).is_file():
            # Sets generated before datasets carried their scheme get it now.
            write_scheme(root, artefact_scheme())
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "images").mkdir(parents=True)
        (tmp / "annotations").mkdir()
        rows = []
        show = progress(f"synthetic set {root.name}: images", count)
        for index in range(count):
            image, mask, material, content = _render(index, size, seed)
            name = f"synthetic_{index:04d}"
            Image.fromarray(image).save(tmp / "images" / f"{name}.png")
            Image.fromarray(mask).save(tmp / "annotations" / f"{name}.png")
            rows.append((name, material, content, size, size))
            show(index + 1)
        write_metadata(tmp / "metadata.csv", rows)
        write_scheme(tmp, artefact_scheme())
        try:
            # rename(2) replaces an empty directory atomically and refuses a non-empty one.
            os.rename(tmp, root)
        except OSError:
            if not _complete(root, count, size):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
