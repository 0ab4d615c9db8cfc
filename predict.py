"""Full-resolution damage maps for artwork photographs: sliding-window inference, colour overlays, area report.

    python predict.py --checkpoint run/best.pt IMG_OR_DIR [...] --out DIR [--tta] [--masks DIR]

The model sees tiles of its training size (``--img-size``, default the checkpoint's) with ``--overlap``
between neighbours. Each tile's class probabilities are weighted by a separable sin^2 window that is
largest in the tile centre and small but never zero at its edges, summed, and divided by the summed
weights, so seams from tile borders fade out and every pixel (image borders included) has a prediction.
Tiles are taken one row of tiles at a time and the running sums keep only the rows that a later tile row
can still reach (``C x tile x width`` floats), so memory stays bounded for images of 100+ megapixels;
finished rows are turned into class ids at once.

Per image ``--out`` gets ``<stem>_mask.png`` (indexed PNG: pixel value = ARTeFACT id, palette = ARTeFACT
colours), ``<stem>_overlay.png`` (``.jpg`` above HUGE_OVERLAY_PIXELS) with the damage blended over the
image and a legend, and ``<stem>_report.json``; ``report.csv`` holds one row per image and class. With
``--masks DIR`` the mask of the same stem marks the object (255 = outside, left out of all areas) and the
per-class IoU of the prediction against that mask is reported too.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data import BACKGROUND_COLOUR, CLASS_NAMES, MEAN, NUM_CLASSES, PALETTE, STD, UserError, read_image, read_mask
from losses import COARSE_OF_FINE
from model import build_model, check_img_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OUTSIDE = 255
HUGE_OVERLAY_PIXELS = 40_000_000
PROGRESS_MIN_TILES = 32
ROWS_PER_CHUNK = 512
COLOURS = np.zeros((256, 3), dtype=np.uint8)
COLOURS[:NUM_CLASSES] = PALETTE
COLOURS[OUTSIDE] = BACKGROUND_COLOUR


def tile_starts(size, tile, overlap):
    """Start offsets of tiles covering ``size`` (>= tile); the last tile is flush with the far border."""
    stride = max(1, round(tile * (1 - overlap)))
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def tile_count(height, width, tile, overlap):
    return len(tile_starts(max(height, tile), tile, overlap)) * len(tile_starts(max(width, tile), tile, overlap))


def blend_window(n):
    """sin^2 taper over n pixels, sampled at pixel centres so that even the edge pixels keep a weight > 0."""
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.sin(torch.pi * centres).pow(2).float()


def coverage(size, starts, window):
    """Summed window weight per pixel along one axis; the 2-D sum is the outer product of two of these."""
    total = torch.zeros(size)
    for start in starts:
        total[start:start + len(window)] += window
    return total


def head_probs(output, consistency=False):
    """Class probabilities (B, 16, h, w) from a model output.

    Hierarchical models return dict(fine, coarse, binary); the fine head is used. With ``consistency``
    each fine class is also weighted by the probability of its coarse group and of clean/damage
    (a product of the three heads, renormalised; computed in log space so it cannot underflow).
    """
    if not isinstance(output, dict):
        return output.float().softmax(1)
    fine = output["fine"].float().log_softmax(1)
    if not consistency:
        return fine.exp()
    group = COARSE_OF_FINE.to(fine.device)
    coarse = output["coarse"].float().log_softmax(1)[:, group]
    binary = output["binary"].float().log_softmax(1)[:, (group > 0).long()]
    return (fine + coarse + binary).softmax(1)


def _tile_probs(model, tiles, tta, consistency, autocast):
    with autocast:
        output = model(tiles)
    probs = head_probs(output, consistency)
    if not tta:
        return probs
    flips = [(3,), (2,), (2, 3)]
    for dims in flips:
        with autocast:
            output = model(tiles.flip(dims))
        probs += head_probs(output, consistency).flip(dims)
    return probs.div_(len(flips) + 1)


def _strip(image, y, tile_h, tile_w, device):
    """Rows y..y+tile_h as a normalised (3, tile_h, >= tile_w) tensor; reflect-padded when the image is smaller."""
    rows = image[y:y + tile_h]
    pad_h, pad_w = tile_h - rows.shape[0], max(0, tile_w - rows.shape[1])
    if pad_h or pad_w:
        rows = np.pad(rows, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    strip = torch.tensor(rows, device=device).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(STD, device=device).view(3, 1, 1)
    return strip.sub_(mean).div_(std)


def accumulator_shape(num_classes, tile, width):
    """Shape of the running probability sums: independent of the image height, linear in its width."""
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    return num_classes, tile_h, max(width, tile_w)


@torch.inference_mode()
def _blended_sums(model, image, tile, overlap, batch_size, tta, device, precision, progress, consistency):
    """Yield (row0, sums, weights): window-weighted probability sums (C, rows, W) of finished image rows and
    their summed weights (rows, W). ``sums`` is a view into the running buffer, valid until the next step."""
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    height, width = image.shape[:2]
    padded_h, padded_w = max(height, tile_h), max(width, tile_w)
    ys, xs = tile_starts(padded_h, tile_h, overlap), tile_starts(padded_w, tile_w, overlap)
    window_y, window_x = blend_window(tile_h), blend_window(tile_w)
    norm_y = coverage(padded_h, ys, window_y).to(device)
    norm_x = coverage(padded_w, xs, window_x)[:width].to(device)
    window = (window_y[:, None] * window_x[None, :]).to(device)
    total, done, base, sums = len(ys) * len(xs), 0, 0, None
    was_training = model.training
    model.eval()
    try:
        for y in ys:
            if y > base:
                stop = min(y, height)
                if stop > base:
                    yield base, sums[:, :stop - base, :width], norm_y[base:stop, None] * norm_x
                # Rows above y are final: no later tile row starts above y. Moving the rest up in steps
                # of the shift keeps source and destination apart, so no second buffer is needed.
                shift = y - base
                keep = tile_h - shift
                for row in range(0, keep, shift):
                    end = min(row + shift, keep)
                    sums[:, row:end] = sums[:, row + shift:end + shift]
                sums[:, keep:] = 0
                base = y
            strip = _strip(image, y, tile_h, tile_w, device)
            for i in range(0, len(xs), batch_size):
                starts = xs[i:i + batch_size]
                tiles = torch.stack([strip[:, :, x:x + tile_w] for x in starts])
                probs = _tile_probs(model, tiles, tta, consistency, autocast)
                if sums is None:
                    sums = probs.new_zeros(accumulator_shape(probs.shape[1], (tile_h, tile_w), padded_w))
                for tile_probs, x in zip(probs, starts):
                    sums[:, :, x:x + tile_w].addcmul_(tile_probs, window)
                done += len(starts)
                if progress is not None:
                    progress(done, total)
        stop = min(base + tile_h, height)
        yield base, sums[:, :stop - base, :width], norm_y[base:stop, None] * norm_x
    finally:
        model.train(was_training)


def predict_strips(model, image, tile, overlap=0.25, batch_size=8, tta=False, device=None, precision="fp32",
                   progress=None, consistency=False):
    """Yield (row0, probs) for consecutive bands of ``image`` (uint8 H x W x 3), top to bottom.

    ``probs`` is a float32 (C, rows, W) tensor on ``device`` holding the blended class probabilities of image
    rows row0..row0+rows; the bands cover every row once. ``tile`` is an int or (h, w); up to ``batch_size``
    tiles go through the model at once; ``tta`` averages the probabilities over horizontal, vertical and
    both flips; ``precision`` is bf16, fp16 or fp32 (autocast); ``device`` defaults to the model's;
    ``progress(done_tiles, total_tiles)`` is called after every batch; ``consistency`` combines the heads
    of a hierarchical model (see head_probs). The model is in eval mode meanwhile and restored afterwards.
    """
    for row0, sums, weights in _blended_sums(model, image, tile, overlap, batch_size, tta, device, precision,
                                             progress, consistency):
        yield row0, sums / weights


def predict_image(model, image, tile, overlap=0.25, batch_size=8, tta=False, device=None, precision="fp32",
                  progress=None, consistency=False):
    """Class ids (uint8 H x W) for a uint8 H x W x 3 image of any size; arguments as in predict_strips."""
    labels = np.empty(image.shape[:2], dtype=np.uint8)
    # The per-pixel weight divides every class alike, so the argmax of the sums needs no normalised copy;
    # max(0).indices is that argmax (first maximum on ties) and on CPU several times faster than argmax(0).
    for row0, sums, _ in _blended_sums(model, image, tile, overlap, batch_size, tta, device, precision,
                                       progress, consistency):
        labels[row0:row0 + sums.shape[1]] = sums.max(0).indices.to(torch.uint8).cpu().numpy()
    return labels


def _row_chunks(height):
    return [(r, min(r + ROWS_PER_CHUNK, height)) for r in range(0, height, ROWS_PER_CHUNK)]


def blend(image, labels, alpha=0.5):
    """Image with every non-clean pixel mixed with its class colour: round((1-alpha)*pixel + alpha*colour)."""
    out = image.copy()
    marked = labels != 0
    mixed = image[marked] * np.float32(1 - alpha) + COLOURS[labels[marked]] * np.float32(alpha)
    out[marked] = np.rint(mixed).astype(np.uint8)
    return out


def confusion(labels, truth):
    """(256, 256) int64 counts of (truth, predicted) pairs, counted in row chunks to keep temporaries small."""
    counts = np.zeros(256 * 256, dtype=np.int64)
    for r0, r1 in _row_chunks(labels.shape[0]):
        pairs = truth[r0:r1].astype(np.int64) * 256 + labels[r0:r1]
        counts += np.bincount(pairs.ravel(), minlength=256 * 256)
    return counts.reshape(256, 256)


def area_report(labels, truth=None):
    """Damaged area per class as pixels and % of the object, and, given a ground-truth mask, IoU per class.

    The object is the whole image, or the pixels that ``truth`` does not mark 255. ``labels`` must already
    hold 255 outside the object. IoU is reported for classes present in the truth or the prediction (others
    None); ``miou`` averages those; ``damage_iou`` is the IoU of any-damage vs clean.
    """
    if truth is None:
        pixels = confusion(labels, np.broadcast_to(np.uint8(0), labels.shape)).sum(0)
    else:
        table = confusion(labels, truth)
        pixels = table[:OUTSIDE].sum(0)
    object_pixels = int(pixels[:NUM_CLASSES].sum())
    classes = []
    for class_id, name in enumerate(CLASS_NAMES):
        count = int(pixels[class_id])
        classes.append({"id": class_id, "name": name, "pixels": count,
                        "percent": round(100 * count / max(object_pixels, 1), 4), "iou": None})
    damaged = object_pixels - int(pixels[0])
    report = {"object_pixels": object_pixels, "damaged_pixels": damaged,
              "damaged_percent": round(100 * damaged / max(object_pixels, 1), 4), "classes": classes}
    if truth is not None:
        cm = table[:NUM_CLASSES, :NUM_CLASSES]
        union = cm.sum(0) + cm.sum(1) - np.diag(cm)
        ious = [float(cm[c, c] / union[c]) if union[c] else None for c in range(NUM_CLASSES)]
        for entry, iou in zip(classes, ious):
            entry["iou"] = None if iou is None else round(iou, 6)
        present = [iou for iou in ious if iou is not None]
        clean_hit, damage_hit = cm[0, 0], cm[1:, 1:].sum()
        damage_union = cm.sum() - clean_hit
        report["miou"] = round(float(np.mean(present)), 6) if present else None
        report["damage_iou"] = round(float(damage_hit / damage_union), 6) if damage_union else None
    return report


def write_mask(path, labels):
    """Indexed PNG whose pixel values are ARTeFACT ids and whose palette holds the ARTeFACT colours."""
    mask = Image.fromarray(labels)
    mask.putpalette(COLOURS.tobytes())
    mask.save(path)


def _legend(width, report, outside):
    entries = [(COLOURS[c["id"]], f"{c['name']} {c['percent']:.2f} %") for c in report["classes"] if c["pixels"]]
    if outside:
        entries.append((COLOURS[OUTSIDE], "Outside object"))
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


def render_overlay(image, labels, report, alpha=0.5):
    """The image with damage (and outside-object pixels) blended in their colours, a legend strip below it."""
    height, width = labels.shape
    legend = _legend(width, report, outside=bool((labels == OUTSIDE).any()))
    canvas = Image.new("RGB", (width, height + legend.height))
    for r0, r1 in _row_chunks(height):
        canvas.paste(Image.fromarray(blend(image[r0:r1], labels[r0:r1], alpha)), (0, r0))
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


def load_checkpoint(path, device="cpu", img_size=None):
    """(model in eval mode on device, config) from a train.py checkpoint dict (keys model, config, ...)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: not found; pass the best.pt or last.pt of a training run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise UserError(f"--checkpoint {path}: holds Python objects besides tensors and plain values, which "
                            "predict.py does not unpickle (they could run code); save the checkpoint's model "
                            "state_dict and config dict into a new file") from None
        raise UserError(f"--checkpoint {path}: not a readable PyTorch checkpoint (torch.load raised "
                        f"{type(exc).__name__}); pass a best.pt or last.pt written by train.py") from None
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or "encoder" not in config or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"--checkpoint {path}: unknown checkpoint format (expected a dict with 'model' and a "
                        "'config' naming the encoder); pass a best.pt or last.pt written by train.py")
    num_classes = config.get("num_classes", NUM_CLASSES)
    if num_classes != NUM_CLASSES:
        raise UserError(f"--checkpoint {path}: model has {num_classes} classes, the ARTeFACT report needs "
                        f"{NUM_CLASSES}; pass a checkpoint trained on the ARTeFACT labels")
    img_size = img_size or config.get("img_size", 384)
    check_img_size(config["encoder"], img_size)
    model = build_model(config["encoder"], num_classes=num_classes, decoder=config.get("decoder", "unet"),
                        heads=config.get("heads", "fine"), pretrained=False, img_size=img_size,
                        norm=config.get("norm", "bn"))
    # DDP and torch.compile prefix parameter names; the weights are the same.
    state = {}
    for key, value in checkpoint["model"].items():
        for prefix in ("_orig_mod.", "module."):
            key = key.removeprefix(prefix)
        state[key] = value
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"--checkpoint {path}: weights do not fit the model its config describes ({reason}); "
                        "pass the matching --img-size or an unmodified checkpoint") from None
    return model.to(device).eval(), config


def _progress_printer(name):
    def show(done, total):
        end = "\n" if done == total else ""
        print(f"\r{name}: {done}/{total} tiles ({100 * done // total} %)", end=end, file=sys.stderr, flush=True)
    return show


CSV_FIELDS = ["image", "class_id", "class_name", "pixels", "percent", "iou"]


def predict_file(model, path, args, tile, writer):
    image = read_image(path)
    height, width = image.shape[:2]
    truth = None
    if args.masks:
        mask_path = find_mask(args.masks, path)
        truth = read_mask(mask_path)
        if truth.shape != image.shape[:2]:
            raise UserError(f"{mask_path}: mask is {truth.shape[1]}x{truth.shape[0]} but {path} is "
                            f"{width}x{height}; pass masks of the same size as their images")
    large = tile_count(height, width, tile, args.overlap) >= PROGRESS_MIN_TILES
    progress = _progress_printer(path.name) if large else None
    labels = predict_image(model, image, tile, args.overlap, args.batch_size, args.tta, args.device,
                           args.precision, progress, args.consistency)
    if truth is not None:
        labels[truth == OUTSIDE] = OUTSIDE
    report = area_report(labels, truth)
    out = Path(args.out)
    mask_path_out = out / f"{path.stem}_mask.png"
    overlay_ext = ".jpg" if height * width > HUGE_OVERLAY_PIXELS else ".png"
    overlay_path = out / f"{path.stem}_overlay{overlay_ext}"
    write_mask(mask_path_out, labels)
    render_overlay(image, labels, report).save(overlay_path, **({"quality": 90} if overlay_ext == ".jpg" else {}))
    report = {"image": str(path), "width": width, "height": height,
              "object": str(mask_path) if truth is not None else "whole image", **report,
              "mask": str(mask_path_out), "overlay": str(overlay_path),
              "settings": {"checkpoint": str(args.checkpoint), "tile": tile, "overlap": args.overlap,
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files or folders of png/jpg/tif images")
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a training run")
    parser.add_argument("--out", required=True, help="folder for masks, overlays and reports")
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction of a tile shared by neighbours")
    parser.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips (4x slower)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--masks", help="folder of object/ground-truth masks named like the images")
    parser.add_argument("--img-size", type=int, help="tile size (default: the training --img-size)")
    parser.add_argument("--precision", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--consistency", action="store_true",
                        help="hierarchical checkpoints: weight fine classes by their coarse and damage heads")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap}: must be at least 0 and below 1, e.g. 0.25")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size {args.img_size}: must be a positive tile size, e.g. 384")
    if args.masks and not Path(args.masks).is_dir():
        raise UserError(f"--masks {args.masks}: not a folder; pass the folder holding the masks")
    return args


def run(args):
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a device name; use cpu, cuda or cuda:N") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.precision is None:
        cuda_bf16 = args.device.type == "cuda" and torch.cuda.is_bf16_supported()
        args.precision = "bf16" if cuda_bf16 else "fp32"
    images = list_images(args.images)
    model, config = load_checkpoint(args.checkpoint, args.device, args.img_size)
    tile = args.img_size or config.get("img_size", 384)
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
        for path in images:
            predict_file(model, path, args, tile, writer)
            handle.flush()


def main(argv=None):
    try:
        run(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
