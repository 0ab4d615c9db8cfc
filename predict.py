"""Full-resolution damage maps for artwork photographs: sliding-window inference, colour overlays, area report.

    python predict.py --checkpoint run/best.pt IMG_OR_DIR [...] --out DIR [--tta] [--masks DIR]

The model sees overlapping, blended tiles of its training size (``--img-size``, default the checkpoint's;
see tiles.py), so memory stays bounded for images of 100+ megapixels.

Class ids, names and colours are the checkpoint's label scheme (the one it was trained with). Per image ``--out``
gets ``<stem>_mask.png`` (indexed PNG: pixel value = class id, palette = the scheme's colours),
``<stem>_overlay.png`` (``.jpg`` above HUGE_OVERLAY_PIXELS) with the damage blended over the image, each region
outlined in its full colour, and a legend, and ``<stem>_report.json``; ``report.csv`` holds one row per image
and class. With ``--masks DIR`` the mask of the same stem (read with the scheme) marks the object (the ignore
id = outside, left out of all areas) and the per-class IoU of the prediction against that mask is reported too.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

from labels import HelpFormatter, UserError, colour_table, progress, run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="+", help="image files or folders of png/jpg/tif images")
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a training run")
    parser.add_argument("--out", required=True, help="folder for masks, overlays and reports")
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction (0-1) of a tile shared with each "
                        "neighbour; more overlap blends seams away but costs tiles: 0.25 gives ~1.8x the tiles of 0, "
                        "0.5 ~4x")
    parser.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips (4x slower)")
    # --batch-size is the earlier name, kept so existing scripts run.
    parser.add_argument("--tile-batch", "--batch-size", dest="batch_size", type=int, default=8, metavar="N",
                        help="tiles per forward pass (more: faster on a GPU, more memory)")
    parser.add_argument("--masks", help="folder of object/ground-truth masks named like the images (default: none; "
                        "the whole image is the object)")
    parser.add_argument("--img-size", type=int, help="tile side (px) (default: the training --img-size)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="autocast dtype (default: bf16 on "
                        "GPUs with bf16 tensor cores, fp16 on older GPUs, fp32 on CPU)")
    parser.add_argument("--consistency", action="store_true",
                        help="hierarchical checkpoints: weight fine classes by their coarse and damage heads")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: OMP_NUM_THREADS if set, else "
                        "torch's choice)")
    args = parser.parse_args(argv)
    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap}: must be at least 0 and below 1, e.g. 0.25")
    if args.batch_size < 1:
        raise UserError(f"--tile-batch {args.batch_size}: must be at least 1 (tiles)")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1 (threads)")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size {args.img_size}: must be a positive tile size, e.g. 384")
    if args.masks and not Path(args.masks).is_dir():
        raise UserError(f"--masks {args.masks}: not a folder; pass the folder holding the masks")
    return args


if __name__ == "__main__" and run_cli(parse_args):
    # --help and flag mistakes answer before torch loads (seconds on a cold node); main() parses again.
    sys.exit(2)

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from checkpoint import checkpoint_scheme, load_checkpoint, model_from_checkpoint
from config import auto_precision
from files import IMAGE_SUFFIXES, read_image, read_mask, scaled_shape
from metrics import confusion, iou_report
from model import check_img_size
from tiles import predict_at_scale, tile_count

HUGE_OVERLAY_PIXELS = 40_000_000
PROGRESS_MIN_TILES = 32
ROWS_PER_CHUNK = 512


def _row_chunks(height):
    return [(r, min(r + ROWS_PER_CHUNK, height)) for r in range(0, height, ROWS_PER_CHUNK)]


def blend(image, labels, scheme, alpha=0.5, edges=None):
    """Image with every non-clean pixel mixed with its class colour (the scheme's; the ignore colour outside the
    object): round((1-alpha)*pixel + alpha*colour); pixels marked in ``edges`` get the full class colour instead."""
    colours = colour_table(scheme)
    out = image.copy()
    marked = labels != scheme.clean
    mixed = image[marked] * np.float32(1 - alpha) + colours[labels[marked]] * np.float32(alpha)
    out[marked] = np.rint(mixed).astype(np.uint8)
    if edges is not None:
        out[edges] = colours[labels[edges]]
    return out


def region_edges(labels, scheme):
    """Damage pixels with a 4-neighbour (inside ``labels``) of another label: the 1-px border of each region.

    Blended at half strength, dark classes (Stamp, Burn marks, Puncture) vanish into dark paint; drawn in full
    colour, their borders, and the whole of regions only a pixel or two wide, stay visible.
    """
    edges = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:] != labels[:-1]
    edges[1:] |= vertical
    edges[:-1] |= vertical
    horizontal = labels[:, 1:] != labels[:, :-1]
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    return edges & (labels != scheme.clean) & (labels != scheme.ignore)


def area_report(labels, scheme, truth=None):
    """Damaged area per class of the label scheme as pixels and % of the object, and, given a ground-truth mask,
    IoU per class.

    The object is the whole image, or the pixels that ``truth`` does not mark with the ignore id. ``labels``
    must already hold the ignore id outside the object. IoU is reported for classes present in the truth or the
    prediction (others None); ``miou`` averages those; ``damage_iou`` is the IoU of any-damage vs clean.
    """
    # Without a mask the object is every pixel the labels do not mark outside.
    object_truth = np.where(labels == scheme.ignore, scheme.ignore, scheme.clean).astype(np.uint8) \
        if truth is None else truth
    cm = torch.zeros(scheme.num_classes, scheme.num_classes, dtype=torch.long)
    # Row chunks keep the int64 temporaries small for 100+ megapixel images.
    for r0, r1 in _row_chunks(labels.shape[0]):
        cm += confusion(torch.from_numpy(labels[r0:r1].astype(np.int64)),
                        torch.from_numpy(object_truth[r0:r1].astype(np.int64)), scheme.num_classes, scheme.ignore)
    pixels = cm.sum(0).tolist()
    object_pixels = sum(pixels)
    classes = [{"id": class_id, "name": name, "pixels": pixels[class_id],
                "percent": round(100 * pixels[class_id] / max(object_pixels, 1), 4), "iou": None}
               for class_id, name in enumerate(scheme.names)]
    damaged = object_pixels - pixels[scheme.clean]
    report = {"object_pixels": object_pixels, "damaged_pixels": damaged,
              "damaged_percent": round(100 * damaged / max(object_pixels, 1), 4), "classes": classes}
    if truth is not None:
        scores = iou_report(cm, scheme.names, scheme.clean)
        for entry in classes:
            iou = scores["iou"][entry["name"]]
            entry["iou"] = None if iou is None else round(iou, 6)
        defined = [iou for iou in scores["iou"].values() if iou is not None]
        report["miou"] = round(scores["miou"], 6) if defined else None
        report["damage_iou"] = None if scores["binary_iou"] is None else round(scores["binary_iou"], 6)
    return report


def write_mask(path, labels, scheme):
    """Indexed PNG whose pixel values are class ids and whose palette holds the label scheme's colours."""
    mask = Image.fromarray(labels)
    mask.putpalette(colour_table(scheme).tobytes())
    mask.save(path)


def legend_entries(report, outside, scheme):
    """(colour, text) of each damage class found, then the outside-object colour; the clean class is not drawn,
    so it gets no swatch, and a class under 0.01 % of the object reads "<0.01 %" rather than "0.00 %"."""
    entries = [(scheme.colours[c["id"]], f"{c['name']} {_percent(c['percent'])}") for c in report["classes"]
               if c["pixels"] and c["id"] != scheme.clean]
    if outside:
        entries.append((scheme.ignore_colour, "Outside object"))
    return entries


def _percent(value):
    return "<0.01 %" if value < 0.01 else f"{value:.2f} %"


def _legend(width, report, outside, scheme):
    entries = legend_entries(report, outside, scheme)
    size = max(12, width // 100)
    font = ImageFont.load_default(size=size)
    pad, line = size // 2, size + size // 2
    placed, x, y = [], pad, pad
    for colour, text in entries:
        entry_w = size + pad + int(font.getlength(text)) + 2 * pad
        if x > pad and x + entry_w > width:
            x, y = pad, y + line
        placed.append((x, y, colour, text))
        x += entry_w
    legend = Image.new("RGB", (width, y + line + pad), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for x, y, colour, text in placed:
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=tuple(int(v) for v in colour), outline=(128, 128, 128))
        draw.text((x + size + pad, y), text, fill=(0, 0, 0), font=font)
    return legend


def render_overlay(image, labels, report, scheme, alpha=0.5):
    """The image with damage (and outside-object pixels) blended in the scheme's colours, each damage region
    outlined in its full colour, a legend strip below it."""
    height, width = labels.shape
    legend = _legend(width, report, bool((labels == scheme.ignore).any()), scheme)
    canvas = Image.new("RGB", (width, height + legend.height))
    for r0, r1 in _row_chunks(height):
        # One halo row above and below, so that region borders do not depend on where the chunks are cut.
        h0, h1 = max(r0 - 1, 0), min(r1 + 1, height)
        edges = region_edges(labels[h0:h1], scheme)[r0 - h0:r0 - h0 + r1 - r0]
        canvas.paste(Image.fromarray(blend(image[r0:r1], labels[r0:r1], scheme, alpha, edges)), (0, r0))
    canvas.paste(legend, (0, height))
    return canvas


def list_images(paths):
    """Image files named directly or found (not recursively) in the named folders, in a stable order."""
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            images.extend(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                                 and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"{path}: not found; pass image files or folders of png/jpg/tif images")
    if not images:
        raise UserError(f"no png/jpg/tif images in {' '.join(map(str, paths))}; pass image files or folders")
    seen = {}
    for path in images:
        if path.stem in seen and seen[path.stem] != path:
            raise UserError(f"{path} and {seen[path.stem]} would write the same outputs; rename one or run them "
                            "separately")
        seen[path.stem] = path
    return list(dict.fromkeys(images))


def find_mask(folder, image_path):
    for suffix in IMAGE_SUFFIXES:
        candidate = Path(folder) / (image_path.stem + suffix)
        if candidate.is_file():
            return candidate
    raise UserError(f"--masks {folder}: no mask named {image_path.stem}.png for {image_path}; add it or drop --masks")


def load_model(path, device, img_size=None):
    """(model in eval mode on device, config, label scheme) of a train.py checkpoint; img_size overrides the tile
    size."""
    checkpoint = load_checkpoint(path)
    img_size = img_size or checkpoint["config"].get("img_size", 384)
    check_img_size(checkpoint["config"]["encoder"], img_size)
    model = model_from_checkpoint(checkpoint, path, img_size)
    # channels_last: the layout convolutions run fastest in on GPUs (tensor cores) and oneDNN CPUs.
    return (model.to(device, memory_format=torch.channels_last).eval(), checkpoint["config"],
            checkpoint_scheme(checkpoint, path))


def _progress_printer(name):
    """show(done, total) for the tiles of one large image: plain lines, at most every 10 s and at the end."""
    show = None

    def tiles(done, total):
        nonlocal show
        show = show or progress(f"{name}: tiles", total)
        show(done)
    return tiles


CSV_FIELDS = ["image", "class_id", "class_name", "pixels", "percent", "iou"]


def predict_file(model, path, args, tile, writer):
    image = read_image(path)
    height, width = image.shape[:2]
    truth = None
    if args.masks:
        mask_path = find_mask(args.masks, path)
        truth = read_mask(mask_path, args.scheme)
        if truth.shape != image.shape[:2]:
            raise UserError(f"{mask_path}: mask is {truth.shape[1]}x{truth.shape[0]} but {path} is "
                            f"{width}x{height}; pass masks of the same size as their images")
    large = tile_count(*scaled_shape(height, width, tile, args.work_size), tile, args.overlap) >= PROGRESS_MIN_TILES
    progress = _progress_printer(path.name) if large else None
    # At the checkpoint's working scale, then back to the photograph's own size for the map and the report.
    labels = predict_at_scale(model, image, tile, args.work_size, overlap=args.overlap, batch_size=args.batch_size,
                              tta=args.tta, device=args.device, precision=args.precision, progress=progress,
                              hierarchy=args.scheme if args.consistency else None)
    if truth is not None:
        labels[truth == args.scheme.ignore] = args.scheme.ignore
    report = area_report(labels, args.scheme, truth)
    out = Path(args.out)
    mask_path_out = out / f"{path.stem}_mask.png"
    overlay_ext = ".jpg" if height * width > HUGE_OVERLAY_PIXELS else ".png"
    overlay_path = out / f"{path.stem}_overlay{overlay_ext}"
    write_mask(mask_path_out, labels, args.scheme)
    render_overlay(image, labels, report, args.scheme).save(overlay_path,
                                                           **({"quality": 90} if overlay_ext == ".jpg" else {}))
    report = {"image": str(path), "width": width, "height": height,
              "object": str(mask_path) if truth is not None else "whole image", **report,
              "mask": str(mask_path_out), "overlay": str(overlay_path),
              "settings": {"checkpoint": str(args.checkpoint), "tile": tile, "work_size": args.work_size,
                           "overlap": args.overlap,
                           "tta": args.tta, "precision": args.precision, "consistency": args.consistency}}
    (out / f"{path.stem}_report.json").write_text(json.dumps(report, indent=2) + "\n")
    for entry in report["classes"]:
        writer.writerow({"image": path.name, "class_id": entry["id"], "class_name": entry["name"],
                         "pixels": entry["pixels"], "percent": entry["percent"],
                         "iou": "" if entry["iou"] is None else entry["iou"]})
    line = f"{path.name}: {report['damaged_percent']:.2f} % of the object damaged"
    if truth is not None and report["miou"] is not None:
        line += f", mIoU vs mask {100 * report['miou']:.1f} %"
    print(line + f" -> {mask_path_out}")


def run(args):
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a device name; use cpu, cuda or cuda:N") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = auto_precision(args.device)
    images = list_images(args.images)
    model, config, args.scheme = load_model(args.checkpoint, args.device, args.img_size)
    tile = args.img_size or config.get("img_size", 384)
    # Checkpoints from before --work-size were trained on whole images squashed to the tile.
    args.work_size = config.get("work_size", 0)
    if args.consistency and config.get("heads", "fine") != "hierarchical":
        print("note: --consistency needs a --heads hierarchical checkpoint; using the fine head", file=sys.stderr)
        args.consistency = False
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror}); pass a writable folder") from None
    with open(out / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        failed = 0
        folder = progress("image", len(images), every=0)
        for done, path in enumerate(images, 1):
            try:
                predict_file(model, path, args, tile, writer)
            except UserError as exc:
                if len(images) == 1:
                    raise
                # One unreadable photo must not cost the maps of the rest of the folder.
                failed += 1
                print(f"error: {exc} (skipped)", file=sys.stderr, flush=True)
            handle.flush()
            if len(images) > 1:
                folder(done, f" {path.name}")
    if failed:
        raise UserError(f"{failed} of {len(images)} images failed (lines above); the report covers the other "
                        f"{len(images) - failed} in {out}")


def main(argv=None):
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
