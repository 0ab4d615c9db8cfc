"""Damage maps for photographs of artworks (CLI): where the damage is, what kind, and how much of the object.

    python predict.py --checkpoint runs/NAME/model.pt IMG_OR_DIR [...] --out DIR [--object DIR] [--truth DIR]
    python predict.py --checkpoint runs/NAME/best.pt --export model.pt

The model sees overlapping, blended tiles of its training size at the scale it was trained at (tiles.py), and
the label map is taken back to the photograph's own size. Per image ``--out`` gets ``<stem>_mask.png`` (full
size, indexed: pixel value = class id of the checkpoint's label scheme, palette = its colours, the ignore id
outside the object), ``<stem>_overlay.png`` (``.jpg`` above 4 MP; reduced by an integer factor above 25 MP)
with the damage blended over the image, each region outlined, and a legend with the areas, and
``<stem>_report.json``; the folder gets ``areas.csv`` (one row per image), ``scores.csv`` (with --truth) and
``index.html``, a page of every map (gallery.py). The object is an --object mask (black outside, one other
value on it), else the image's alpha channel, else the --truth mask's ignore id, else the whole image; the
report names the source. Images are read, resized and written a strip of rows at a time (strips.py), so memory
stays bounded for images of hundreds of megapixels. predict.py never replaces a file it did not write.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

from labels import HelpFormatter, UserError, progress, run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="*", help="image files or folders of images (any format Pillow reads)")
    parser.add_argument("--checkpoint", required=True, help="model.pt, or best.pt or last.pt of a training run")
    parser.add_argument("--out", help="folder for masks, overlays, reports and index.html")
    parser.add_argument("--export", metavar="FILE", help="write the portable model of --checkpoint to FILE "
                        "(weights, label scheme, network and scale; no optimizer state) instead of predicting")
    parser.add_argument("--object", metavar="DIR", help="folder of object masks named like the images: black (0) "
                        "outside the object, one other value (e.g. white) on it (default: the image's alpha "
                        "channel, else the --truth mask's ignore id, else the whole image)")
    parser.add_argument("--truth", metavar="DIR", help="folder of ground-truth id masks named like the images, in "
                        "the checkpoint's label scheme: the maps are scored against them (IoU, scores.csv)")
    parser.add_argument("--masks", help=argparse.SUPPRESS)
    parser.add_argument("--px-per-mm", type=float, metavar="N", help="pixels per millimetre of the object, for "
                        "areas in mm² (default: the file's resolution, when it states a real one)")
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction (0-1) of a tile shared with each "
                        "neighbour; more overlap blends seams away but costs tiles: 0.25 gives ~1.8x the tiles of 0, "
                        "0.5 ~4x")
    parser.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips (4x slower)")
    # --batch-size is the earlier name, kept so existing scripts run.
    parser.add_argument("--tile-batch", "--batch-size", dest="batch_size", type=int, default=8, metavar="N",
                        help="tiles per forward pass (more: faster on a GPU, more memory)")
    parser.add_argument("--img-size", type=int, help="tile side (px) (default: the training --img-size)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="autocast dtype (default: bf16 on "
                        "GPUs with bf16 tensor cores, fp16 on older GPUs, fp32 on CPU)")
    parser.add_argument("--consistency", action="store_true",
                        help="hierarchical checkpoints: weight fine classes by their coarse and damage heads")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: OMP_NUM_THREADS if set, else "
                        "torch's choice)")
    args = parser.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args):
    if args.masks:
        raise UserError("--masks is gone: it meant both an object mask and a ground truth; pass --object DIR for "
                        "object masks (black outside, one other value on the object) or --truth DIR for id masks "
                        "to score the maps against")
    if args.export:
        return
    if not args.images or not args.out:
        raise UserError("pass image files or folders and --out DIR (or --export FILE to write a portable model)")
    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap}: must be at least 0 and below 1, e.g. 0.25")
    if args.batch_size < 1:
        raise UserError(f"--tile-batch {args.batch_size}: must be at least 1 (tiles)")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1 (threads)")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size {args.img_size}: must be a positive tile size, e.g. 384")
    if args.px_per_mm is not None and not args.px_per_mm > 0:
        raise UserError(f"--px-per-mm {args.px_per_mm}: must be a positive number of pixels per millimetre")
    for flag, folder in (("--object", args.object), ("--truth", args.truth)):
        if folder and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder}: not a folder; pass the folder holding the masks")


if __name__ == "__main__" and run_cli(parse_args):
    # --help and flag mistakes answer before torch loads (seconds on a cold node); main() parses again.
    sys.exit(2)

import contextlib
import math

import numpy as np
import torch

from areas import (areas_fields, areas_row, label_counts, measured, pixel_scale, scores_fields, scores_row)
from checkpoint import checkpoint_scheme, load_checkpoint, model_from_checkpoint, save_model
from config import auto_precision
from data import MEAN, STD
from files import image_header, scaled_copies, scaled_shape
from gallery import card_pictures, write_page
from labels import colour_table
from metrics import confusion
from model import check_img_size
from objects import alpha_on_disk, find_mask, object_and_truth, object_source
from folders import WRITE_FIX, claim, claim_outputs, list_images, outputs_of
from overlay import render_overlay
from strips import nearest_positions, strip_rows, write_png
from tiles import Tiling, label_strips, predict_image, tile_count
from writes import atomic_write, write_error

# Overlays up to this size are full size (a 24 MP camera image); larger ones are reduced by an integer factor.
OVERLAY_MAX_PIXELS = 25_000_000
# Overlays above this size are saved as JPEG (photographs compress ten times better), smaller ones as PNG.
PNG_OVERLAY_PIXELS = 4_000_000
PROGRESS_MIN_TILES = 32
def write_mask(path, labels, scheme):
    """Indexed PNG whose pixel values are class ids and whose palette holds the label scheme's colours."""
    with open(path, "wb") as f:
        write_png(f, labels.shape[1], labels.shape[0], [labels], colour_table(scheme))


def overlay_factor(height, width):
    """The integer factor an overlay is reduced by: 1 up to OVERLAY_MAX_PIXELS, else the least that fits."""
    return max(1, math.ceil(math.sqrt(height * width / OVERLAY_MAX_PIXELS)))


def load_model(path, device, img_size=None):
    """(model in eval mode on device, config, label scheme) of a train.py checkpoint or a portable model.pt;
    img_size overrides the tile size."""
    checkpoint = load_checkpoint(path)
    normalisation = checkpoint["config"].get("normalisation")
    if normalisation is not None and (tuple(normalisation["mean"]), tuple(normalisation["std"])) != (MEAN, STD):
        raise UserError(f"--checkpoint {path}: its model expects another input normalisation ({normalisation}) "
                        "than this version applies; predict with the version that exported it")
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


def _map_strips(labels, size, pairs, shown_shape, scheme, tally):
    """The full-size label strips to write (the ignore id outside the object), counting as they pass: class
    pixels (tally["counts"]), the confusion matrix against the truth (tally["cm"]) and the rows and columns of
    the reduced overlay's label map (tally["shown"])."""
    height, width = size
    ys, xs = nearest_positions(shown_shape[0], height), nearest_positions(shown_shape[1], width)
    for (row0, strip), (inside, truth) in zip(label_strips(labels, height, width, strip_rows(width)), pairs):
        if inside is not None:
            strip[~inside] = scheme.ignore
        tally["counts"] += label_counts(strip)
        if truth is not None:
            target = np.where(inside, truth, scheme.ignore)
            tally["cm"] += confusion(torch.from_numpy(strip.astype(np.int64)), torch.from_numpy(target.astype(np.int64)),
                                     scheme.num_classes, scheme.ignore)
        tally["shown"].append(strip[ys[(ys >= row0) & (ys < row0 + len(strip))] - row0][:, xs])
        yield strip
    # The object mask's last checks run when it is read to its end.
    for _ in pairs:
        pass


def _predict_working(model, path, header, args, keep_alpha):
    """(label map at the working scale, the image reduced for the overlay) of one image."""
    working_shape = scaled_shape(header.height, header.width, args.tile, args.work_size)
    working, shown = scaled_copies(path, working_shape, overlay_factor(header.height, header.width), keep_alpha)
    large = tile_count(*working_shape, args.tile, args.overlap) >= PROGRESS_MIN_TILES
    tiling = Tiling(args.tile, args.overlap, args.batch_size, args.tta, args.device, args.precision,
                    args.scheme if args.consistency else None)
    labels = predict_image(model, working, tiling, _progress_printer(path.name) if large else None)
    return labels, shown


def map_image(model, path, args):
    """Predicts one image and writes its mask; returns (report numbers, shown image, shown label map)."""
    header = image_header(path)
    size = (header.height, header.width)
    source = {flag: find_mask(folder, path, f"--{flag}") if folder else None
              for flag, folder in (("object", args.object), ("truth", args.truth))}
    scheme, out = args.scheme, Path(args.out)
    tally = {"counts": np.zeros(256, np.int64), "shown": [],
             "cm": torch.zeros(scheme.num_classes, scheme.num_classes, dtype=torch.long)}
    with contextlib.ExitStack() as stack:
        alpha = header.alpha and not source["object"]
        keep, alpha_strips = stack.enter_context(alpha_on_disk(out, header.width)) if alpha else (None, None)
        labels, shown = _predict_working(model, path, header, args, keep)
        pairs = object_and_truth(source, scheme, size, strip_rows(header.width), alpha_strips)
        strips = _map_strips(labels, size, pairs, shown.shape[:2], scheme, tally)
        mask_path = out / f"{path.stem}_mask.png"
        atomic_write(mask_path, lambda tmp: _write_strips(tmp, header.width, header.height, strips, scheme),
                     fix=WRITE_FIX)
    report = {"file": path.name, "image": str(path), "width": header.width, "height": header.height,
              "object_source": object_source(source, alpha, scheme),
              "truth": str(source["truth"]) if source["truth"] else None,
              "scale": pixel_scale(header.dpi, args.px_per_mm)}
    report.update(measured(tally["counts"], scheme, report["scale"], tally["cm"] if source["truth"] else None))
    report["scale"].pop("mm2_per_pixel")
    return report, shown, np.concatenate(tally["shown"]), mask_path


def _write_strips(path, width, height, strips, scheme):
    with open(path, "wb") as f:
        write_png(f, width, height, strips, colour_table(scheme))


def predict_file(model, path, args):
    """Maps, overlay, gallery pictures and report of one image; returns (report, gallery pictures)."""
    report, shown, shown_labels, mask_path = map_image(model, path, args)
    out, scheme = Path(args.out), args.scheme
    factor = overlay_factor(report["height"], report["width"])
    overlay_ext = ".png" if shown_labels.size <= PNG_OVERLAY_PIXELS else ".jpg"
    overlay_path = out / f"{path.stem}_overlay{overlay_ext}"
    overlay = render_overlay(shown, shown_labels, report, scheme)
    atomic_write(overlay_path, lambda tmp: overlay.save(tmp, format="PNG" if overlay_ext == ".png" else "JPEG",
                                                         **({} if overlay_ext == ".png" else {"quality": 90})),
                 fix=WRITE_FIX)
    report["outputs"] = {"mask": mask_path.name, "overlay": overlay_path.name, "overlay_reduced_by": factor,
                         "report": f"{path.stem}_report.json"}
    report["settings"] = {"checkpoint": str(args.checkpoint), "tile": args.tile, "work_size": args.work_size,
                          "overlap": args.overlap, "tta": args.tta, "precision": args.precision,
                          "consistency": args.consistency, "px_per_mm": args.px_per_mm}
    pictures = card_pictures(out, path.stem, shown, shown_labels, scheme)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out / report["outputs"]["report"], lambda tmp: tmp.write_text(text), fix=WRITE_FIX)
    line = f"{path.name}: {report['damaged_percent']:.2f} % of the object damaged"
    if report["damaged_mm2"] is not None:
        line += f" ({report['damaged_mm2']:.1f} mm²)"
    if report.get("miou") is not None:
        line += f", mIoU vs truth {100 * report['miou']:.1f} %"
    print(f"{line}; object: {report['object_source']} -> {mask_path}", flush=True)
    return report, pictures


def _write_error(out, exc):
    """The one line for an OSError met writing into --out (a CSV row, the page), or None for any other error."""
    return write_error(exc.filename or Path(out) / "its files", exc, fix=WRITE_FIX)


def _setup(args):
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


def export(args):
    """--export FILE: the portable model of --checkpoint, and how much smaller it is."""
    source = Path(args.checkpoint)
    size = save_model(load_checkpoint(source), source, args.export, (MEAN, STD))
    print(f"wrote {args.export}: {size / 2**20:.1f} MiB ({source.name}: {source.stat().st_size / 2**20:.1f} MiB; "
          "the optimizer state and training progress are left out)")


def predict_all(model, images, args, out):
    """Maps every image (one that cannot be read is skipped, named, and counted); writes areas.csv, scores.csv
    and index.html as it goes. Returns the number of images that failed."""
    scheme, cards, failed = args.scheme, [], 0
    tables = [("areas.csv", areas_fields(scheme), areas_row)] + ([("scores.csv", scores_fields(scheme), scores_row)]
                                                                  if args.truth else [])
    with contextlib.ExitStack() as stack:
        writers = []
        for name, fields, row in tables:
            handle = stack.enter_context(open(out / name, "w", newline="", encoding="utf-8"))
            writers.append((handle, csv.DictWriter(handle, fieldnames=fields), row))
            writers[-1][1].writeheader()
        folder = progress("image", len(images), every=0)
        for done, path in enumerate(images, 1):
            claim(out, outputs_of(path, scheme))
            try:
                report, pictures = predict_file(model, path, args)
            except UserError as exc:
                if len(images) == 1:
                    raise
                # One unreadable photo must not cost the maps of the rest of the folder.
                failed += 1
                print(f"error: {exc} (skipped)", file=sys.stderr, flush=True)
            else:
                cards.append((report, pictures))
                for handle, writer, row in writers:
                    writer.writerow(row(report, scheme))
                    handle.flush()
            if len(images) > 1:
                folder(done, f" {path.name}")
        write_page(out, cards, scheme, f"Damage maps: {len(cards)} images ({Path(args.checkpoint).name})")
    return failed


def run(args):
    _setup(args)
    if args.export:
        return export(args)
    out = Path(args.out)
    images = list_images(args.images, out)
    model, config, args.scheme = load_model(args.checkpoint, args.device, args.img_size)
    args.tile = args.img_size or config.get("img_size", 384)
    # Checkpoints from before --work-size were trained on whole images squashed to the tile.
    args.work_size = config.get("work_size", 0)
    if args.consistency and config.get("heads", "fine") != "hierarchical":
        print("note: --consistency needs a --heads hierarchical checkpoint; using the fine head", file=sys.stderr)
        args.consistency = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        claim_outputs(out, images, args.scheme, bool(args.truth))
        failed = predict_all(model, images, args, out)
    except OSError as exc:
        error = _write_error(out, exc)
        if error is None:
            raise
        raise error from None
    if failed:
        raise UserError(f"{failed} of {len(images)} images failed (lines above); the maps and areas.csv cover the "
                        f"other {len(images) - failed} in {out}")


def main(argv=None):
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
