"""Sliding-window inference: overlapping tiles of the training size blended into one label map.

The model sees tiles of its training size with ``overlap`` between neighbours. Each tile's class
probabilities are weighted by a separable sin^2 window that is largest in the tile centre and small but never
zero at its edges, summed, and divided by the summed weights, so seams from tile borders fade out and every
pixel (image borders included) has a prediction. Tiles are taken one row of tiles at a time and the running
sums keep only the rows that a later tile row can still reach (``C x tile x width`` floats), so memory stays
bounded for images of 100+ megapixels; finished rows are turned into class ids at once.

One prediction for evaluation and predict.py: both give predict_image the image at its working size (the long
side the model trained at, files.scaled_shape) without any padding, and predict_image alone pads an image
smaller than a tile (reflecting its border); label_strips takes the label map back to the image's own size.
"""
import collections

import numpy as np
import torch

from data import normalize
from files import resize_image, resize_labels, scaled_shape
from model import autocast
from strips import nearest_positions

# Share of a tile its neighbours overlap: 25 % costs ~1.8x the tiles of none and hides tile borders.
OVERLAP = 0.25

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


def head_probs(output, hierarchy=None):
    """Class probabilities (B, C, h, w) from a model output.

    Hierarchical models return dict(fine, coarse, binary); the fine head is used. With ``hierarchy`` (the
    label scheme, whose groups tie the heads together) each fine class is also weighted by the probability of
    its coarse group and of clean/damage (a product of the three heads, renormalised; computed in log space so
    it cannot underflow).
    """
    if not isinstance(output, dict):
        return output.float().softmax(1)
    fine = output["fine"].float().log_softmax(1)
    if hierarchy is None:
        return fine.exp()
    group = torch.tensor(hierarchy.coarse_of_fine, device=fine.device)
    damage = (torch.arange(hierarchy.num_classes, device=fine.device) != hierarchy.clean).long()
    coarse = output["coarse"].float().log_softmax(1)[:, group]
    binary = output["binary"].float().log_softmax(1)[:, damage]
    return (fine + coarse + binary).softmax(1)


def _tile_probs(model, tiles, tta, hierarchy, precision_context):
    with precision_context:
        output = model(tiles)
    probs = head_probs(output, hierarchy)
    if not tta:
        return probs
    flips = [(3,), (2,), (2, 3)]
    for dims in flips:
        with precision_context:
            output = model(tiles.flip(dims))
        probs += head_probs(output, hierarchy).flip(dims)
    return probs.div_(len(flips) + 1)


def _strip(image, y, tile_h, tile_w, device):
    """Rows y..y+tile_h as a normalised (3, tile_h, >= tile_w) tensor; reflect-padded when the image is smaller."""
    rows = image[y:y + tile_h]
    pad_h, pad_w = tile_h - rows.shape[0], max(0, tile_w - rows.shape[1])
    if pad_h or pad_w:
        rows = np.pad(rows, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    return normalize(torch.tensor(rows, device=device)[None])[0]


def accumulator_shape(num_classes, tile, width):
    """Shape of the running probability sums: independent of the image height, linear in its width."""
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    return num_classes, tile_h, max(width, tile_w)


# How predict_image tiles an image: every option but the tile size has a default (see there).
Tiling = collections.namedtuple("Tiling", "tile overlap batch_size tta device precision hierarchy",
                                defaults=(OVERLAP, 8, False, None, "fp32", None))


@torch.inference_mode()
def _blended_sums(model, image, tiling, progress):
    """Yield (row0, sums): window-weighted probability sums (C, rows, W) of finished image rows, a view into
    the running buffer that is valid until the next step."""
    tile, overlap, batch_size, tta, device, precision, hierarchy = tiling
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    precision_context = autocast(precision, device)
    height, width = image.shape[:2]
    padded_h, padded_w = max(height, tile_h), max(width, tile_w)
    ys, xs = tile_starts(padded_h, tile_h, overlap), tile_starts(padded_w, tile_w, overlap)
    window_y, window_x = blend_window(tile_h), blend_window(tile_w)
    window = (window_y[:, None] * window_x[None, :]).to(device)
    total, done, base, sums = len(ys) * len(xs), 0, 0, None
    was_training = model.training
    model.eval()
    try:
        for y in ys:
            if y > base:
                stop = min(y, height)
                if stop > base:
                    yield base, sums[:, :stop - base, :width]
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
                probs = _tile_probs(model, tiles, tta, hierarchy, precision_context)
                if sums is None:
                    sums = probs.new_zeros(accumulator_shape(probs.shape[1], (tile_h, tile_w), padded_w))
                for tile_probs, x in zip(probs, starts):
                    sums[:, :, x:x + tile_w].addcmul_(tile_probs, window)
                done += len(starts)
                if progress is not None:
                    progress(done, total)
        stop = min(base + tile_h, height)
        yield base, sums[:, :stop - base, :width]
    finally:
        model.train(was_training)


def predict_image(model, image, tiling, progress=None):
    """Class ids (uint8 H x W) for a uint8 H x W x 3 image of any size, tiled as the Tiling says.

    ``tile`` is an int or (h, w) with ``overlap`` between neighbours; up to ``batch_size`` tiles go through the
    model at once; ``tta`` averages the probabilities over horizontal, vertical and both flips; ``precision`` is
    bf16, fp16 or fp32 (autocast); ``device`` defaults to the model's; ``hierarchy`` (the label scheme) combines
    the heads of a hierarchical model (see head_probs). ``progress(done_tiles, total_tiles)`` is called after
    every batch. The model is in eval mode meanwhile and restored afterwards."""
    labels = np.empty(image.shape[:2], dtype=np.uint8)
    # The per-pixel weight divides every class alike, so the argmax of the sums needs no normalised copy;
    # max(0).indices is that argmax (first maximum on ties) and on CPU several times faster than argmax(0).
    for row0, sums in _blended_sums(model, image, tiling, progress):
        labels[row0:row0 + sums.shape[1]] = sums.max(0).indices.to(torch.uint8).cpu().numpy()
    return labels


def predict_at_scale(model, image, tiling, work_size):
    """Class ids (uint8 H x W) of an image of any size, predicted at the scale the model was trained at: the
    image is resized to its working size (files.scaled_shape: long side work_size; 0 squashes it to
    tile x tile, the earlier prototype's mode), tiled there by predict_image, and the label map resized back to
    H x W (nearest)."""
    height, width = image.shape[:2]
    scaled_h, scaled_w = scaled_shape(height, width, tiling.tile, work_size)
    labels = predict_image(model, resize_image(image, scaled_h, scaled_w), tiling)
    return resize_labels(labels, height, width)


def label_strips(labels, height, width, rows):
    """(row0, uint8 (n, width)) strips of up to rows rows of a working-scale label map resized to height x width
    (nearest, files.resize_labels' pixels: the same whether taken whole or a strip at a time)."""
    ys, xs = nearest_positions(height, labels.shape[0]), nearest_positions(width, labels.shape[1])
    for row0 in range(0, height, rows):
        yield row0, labels[ys[row0:row0 + rows]][:, xs]
