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
from PIL import Image, ImageDraw, ImageFilter

from files import SCHEME_FILE, write_metadata, write_scheme
from labels import UserError, artefact_scheme, progress

SYNTHETIC_MATERIALS = ("Paper", "Canvas", "Tesserae", "Parchment")
SYNTHETIC_CONTENTS = ("Artistic depiction", "Geometric patterns", "Line art")
# Painting order: broad optical/deposit layers first so that opaque additions and thin marks stay on top.
_DAMAGE_ORDER = (15, 10, 7, 6, 14, 1, 2, 12, 11, 9, 8, 4, 5, 3, 13)
# Random extra damage types per image beyond the two scheduled ones; tuned so Clean is ~87 % of labelled pixels.
_EXTRA_DAMAGE = (0, 0, 1)
_SUPERSAMPLE = 2


def _noise(rng, size, cells, octaves=1):
    """Smooth fractal noise in [0, 1], from coarse random grids upsampled bicubically."""
    total = np.zeros((size, size), np.float32)
    amplitude_sum = 0.0
    for octave in range(octaves):
        n = min(cells * 2 ** octave, size)
        grid = rng.random((n + 1, n + 1), dtype=np.float32)
        layer = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
        total += layer * 0.5 ** octave
        amplitude_sum += 0.5 ** octave
    return np.clip(total / amplitude_sum, 0.0, 1.0)


def _blob(rng, yy, xx, cy, cx, radius, roughness=0.25, harmonics=6):
    """Normalised distance to an irregular blob outline: < 1 inside, grows outwards."""
    dy, dx = yy - cy, xx - cx
    angle = np.arctan2(dy, dx)
    outline = np.ones_like(angle)
    for h in range(1, harmonics + 1):
        outline += roughness * rng.normal() / h * np.cos(h * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) / (radius * np.maximum(outline, 0.35))


def _strokes(size, draw_fn):
    """Antialiased coverage in [0, 1] of whatever draw_fn paints (at 2x, scale given) on a blank layer."""
    big = size * _SUPERSAMPLE
    layer = Image.new("L", (big, big), 0)
    draw_fn(ImageDraw.Draw(layer), _SUPERSAMPLE)
    small = layer.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _width(pixels, scale):
    """Stroke width on the supersampled layer: never thinner than one output pixel, so thin damage stays labelled."""
    return max(scale, int(round(pixels * scale)))


def _composite(img, alpha, colour):
    """Blend colour (RGB triple or per-pixel array) over img in place with per-pixel opacity alpha."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(colour, np.float32)


def _paint(img, mask, alpha, colour, label, threshold=0.4):
    """Composite colour and label the pixels whose coverage passes threshold."""
    _composite(img, alpha, colour)
    mask[alpha >= threshold] = label


def _point(rng, box, pad=0.15):
    y0, x0, y1, x1 = box
    return (rng.uniform(y0 + pad * (y1 - y0), y1 - pad * (y1 - y0)),
            rng.uniform(x0 + pad * (x1 - x0), x1 - pad * (x1 - x0)))


def _jitter(rng, colour, amount=0.05):
    return np.clip(np.asarray(colour, np.float32) + rng.normal(0, amount, 3), 0, 1).astype(np.float32)


def _muted_palette(rng, n):
    """Artist-like colours: moderate saturation, no fully saturated primaries."""
    hue = rng.uniform(0, 1, n)
    sat = rng.uniform(0.1, 0.5, n)
    val = rng.uniform(0.25, 0.8, n)
    k = (np.arange(3)[None, :] * (1 / 3) + hue[:, None]) % 1.0
    rgb = val[:, None] * (1 - sat[:, None] + sat[:, None] * np.clip(np.abs(6 * k - 3) - 1, 0, 1))
    return [tuple(int(255 * c) for c in row) for row in np.clip(rgb, 0, 1)]


def _artistic(rng, size, colours, u):
    """Landscape-like painting: a two-colour sky/ground gradient with soft ellipses and polygons."""
    top, bottom = np.asarray(colours[0], np.float32), np.asarray(colours[1], np.float32)
    horizon = rng.uniform(0.3, 0.7)
    t = np.clip((np.linspace(0, 1, size, dtype=np.float32) - horizon) * 6 + 0.5, 0, 1)[:, None, None]
    canvas = Image.fromarray(((1 - t) * top + t * bottom).repeat(size, 1).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 9)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.05, 0.25, 2) * size
        colour = colours[rng.integers(2, 6)]
        if rng.random() < 0.5:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 7)))
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 2.0) * u))
    img = np.asarray(canvas, np.float32) / 255.0
    img *= (0.9 + 0.2 * _noise(rng, size, 4, 3))[..., None]
    return img


def _geometric(rng, size, colours, u):
    """A painted pattern: stripes, checks, rings or diamonds in a related key."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(8, 24) * u
    c = np.asarray(colours[:3], np.float32) / 255.0
    # Painted patterns keep their motifs in a related key rather than full poster contrast.
    c = c.mean(0) + rng.uniform(0.45, 0.8) * (c - c.mean(0))
    kind = rng.integers(4)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    across = -xx * np.sin(theta) + yy * np.cos(theta)
    if kind == 0:
        sel = (np.floor(along / period) % 3).astype(np.int64)
    elif kind == 1:
        sel = ((np.floor(along / period) + np.floor(across / period)) % 2).astype(np.int64)
    elif kind == 2:
        r = np.hypot(yy - rng.uniform(0, size), xx - rng.uniform(0, size))
        sel = (np.floor(r / period) % 3).astype(np.int64)
    else:
        sel = ((np.abs((along % period) - period / 2) + np.abs((across % period) - period / 2))
               < period * 0.3).astype(np.int64) * 2
    img = Image.fromarray((c[sel] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6 * u))
    return np.asarray(img, np.float32) / 255.0 * (0.92 + 0.16 * _noise(rng, size, 6, 2))[..., None]


def _line_art(rng, size, u):
    """Ink drawing on a pale ground: outlined ellipses and hatching."""
    ground = _jitter(rng, (0.92, 0.89, 0.82), 0.03)
    img = np.empty((size, size, 3), np.float32)
    img[:] = ground
    ink = _jitter(rng, (0.12, 0.09, 0.07) if rng.random() < 0.6 else (0.35, 0.22, 0.12), 0.03)

    def draw_lines(draw, s):
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size * s
            ry, rx = rng.uniform(0.06, 0.3, 2) * size * s
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), outline=255, width=_width(u, s))
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size * s
            half, gap = rng.uniform(0.05, 0.15) * size * s, rng.uniform(2.5, 4.5) * u * s
            angle = rng.uniform(0, np.pi)
            d = np.array([np.cos(angle), np.sin(angle)]) * half
            for k in range(int(2 * half / gap)):
                off = (k * gap - half) * np.array([-np.sin(angle), np.cos(angle)])
                draw.line((cx + off[0] - d[0], cy + off[1] - d[1], cx + off[0] + d[0], cy + off[1] + d[1]),
                          fill=255, width=_width(u, s))

    _composite(img, 0.9 * _strokes(size, draw_lines), ink)
    return img


def _content(rng, size, content):
    """The picture itself, before the material texture: float RGB (S, S, 3) in [0, 1]."""
    colours = _muted_palette(rng, 6)
    u = size / 128
    if content == "Artistic depiction":
        return _artistic(rng, size, colours, u)
    if content == "Geometric patterns":
        return _geometric(rng, size, colours, u)
    return _line_art(rng, size, u)


def _material(rng, img, material, yy, xx):
    """Apply the support's texture (paper fibres, canvas weave, mosaic tiles, parchment blotches)."""
    size = img.shape[0]
    u = size / 128
    if material == "Paper":
        fibres = _noise(rng, size, max(4, size // 3))
        img *= (0.95 + 0.08 * fibres)[..., None]
        img += 0.04
    elif material == "Canvas":
        period = rng.uniform(2.5, 4.0) * u
        weave = np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)
        img *= (1.0 + 0.07 * weave)[..., None]
    elif material == "Tesserae":
        tile = rng.uniform(5, 9) * u
        row = np.floor(yy / tile)
        shift = (row * 0.37 % 1.0) * tile
        col = np.floor((xx + shift) / tile)
        cy = np.clip(((row + 0.5) * tile).astype(np.int64), 0, size - 1)
        cx = np.clip(((col + 0.5) * tile - shift).astype(np.int64), 0, size - 1)
        tiles = img[cy, cx]
        variation = rng.normal(0, 0.04, (int(row.max()) + 2, int(col.max()) + 2)).astype(np.float32)
        tiles = tiles + variation[row.astype(np.int64), col.astype(np.int64)][..., None]
        grout = ((yy % tile) < 0.9 * u) | (((xx + shift) % tile) < 0.9 * u)
        tiles[grout] = _jitter(rng, (0.55, 0.53, 0.5), 0.04)
        img[:] = tiles
    else:
        blotch = _noise(rng, size, 3, 3)
        img *= np.asarray((1.0, 0.93, 0.78), np.float32) * (0.85 + 0.25 * blotch)[..., None]
    np.clip(img, 0, 1, out=img)


def _material_loss(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    ground = _jitter(rng, (0.93, 0.9, 0.82), 0.03)
    # Where the lost layer was itself pale (paper, parchment), the hole shows the darker mount behind it.
    backing = _jitter(rng, (0.5, 0.46, 0.42), 0.04)
    grain = _noise(rng, size, size // 4)[..., None] * 0.04
    for _ in range(rng.integers(1, 4)):
        cy, cx = _point(rng, ctx["box"], 0.05)
        field = _blob(rng, yy, xx, cy, cx, rng.uniform(0.07, 0.19) * size, 0.3)
        inside = field < 1.0
        colour = backing if img[inside].mean() > 0.75 else ground
        img[inside] = (colour - grain)[inside]
        # A torn edge: the surrounding layer breaks off with a thin dark lip.
        lip = inside & (field > 0.9)
        img[lip] *= 0.6
        mask[inside] = 1


def _peel(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    ground = _jitter(rng, (0.72, 0.66, 0.55), 0.05)
    cy, cx = _point(rng, ctx["box"])
    spread = rng.uniform(0.07, 0.15) * size
    for _ in range(rng.integers(8, 18)):
        fy, fx = cy + rng.normal(0, spread), cx + rng.normal(0, spread)
        field = _blob(rng, yy, xx, fy, fx, rng.uniform(0.035, 0.08) * size, 0.45, 12)
        inside = field < 1.0
        lifted = 0.45 * img + 0.55 * ground + 0.08
        img[inside] = np.clip(lifted[inside], 0, 1)
        # Lifted flakes catch light on one side and cast a shadow on the other.
        rim = inside & (field > 0.75)
        lit = (yy - fy) + (xx - fx) < -0.015 * size
        img[rim & lit] = img[rim & lit] * 0.7 + 0.3
        img[rim & ~lit] *= 0.35
        mask[inside] = 2


def _dust(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    y0, x0, y1, x1 = ctx["box"]
    light = _jitter(rng, (0.9, 0.89, 0.86), 0.03)
    dark = _jitter(rng, (0.22, 0.21, 0.2), 0.03)
    # Dust is seen where it contrasts: pale specks on dark passages, grey specks on pale ones.
    colour = np.where((img.mean(-1) < 0.55)[..., None], light, dark)
    cy, cx = _point(rng, ctx["box"], 0.0)
    spread = rng.uniform(0.15, 0.5) * size

    def specks(draw, s):
        n = rng.integers(40, 140)
        py, px = cy + rng.normal(0, spread, n), cx + rng.normal(0, spread, n)
        radii = np.maximum(0.6, rng.uniform(0.5, 1.3, n) * u) * s
        keep = (py > y0) & (py < y1) & (px > x0) & (px < x1)
        for y, x, r in zip(py[keep] * s, px[keep] * s, radii[keep]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)

    _paint(img, mask, 0.9 * _strokes(size, specks), colour, 3)


def _scratch(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    # A scratch exposes a bright layer; on an already pale surface the groove reads as a grey line instead.
    colour = np.where((img.mean(-1) < 0.7)[..., None], _jitter(rng, (0.92, 0.91, 0.88), 0.03), img * 0.55)
    direction = rng.uniform(0, np.pi)

    def lines(draw, s):
        for _ in range(rng.integers(2, 7)):
            cy, cx = _point(rng, ctx["box"], 0.1)
            angle = direction + rng.normal(0, 0.12)
            half = rng.uniform(0.1, 0.35) * size
            bend = rng.normal(0, 0.012) * size
            t = np.linspace(-1, 1, 12)
            px = cx + t * half * np.cos(angle) - (1 - t ** 2) * bend * np.sin(angle)
            py = cy + t * half * np.sin(angle) + (1 - t ** 2) * bend * np.cos(angle)
            width = _width(rng.uniform(0.8, 1.6) * u, s)
            draw.line(list(zip(px * s, py * s)), fill=255, width=width)

    _paint(img, mask, 0.95 * _strokes(size, lines), colour, 4)


def _hair(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    colour = _jitter(rng, (0.08, 0.06, 0.05), 0.03)

    def curves(draw, s):
        for _ in range(rng.integers(1, 4)):
            cy, cx = _point(rng, ctx["box"], 0.1)
            steps = int(rng.uniform(0.3, 0.7) * size / (1.5 * u))
            turn = np.cumsum(rng.normal(0, 0.12, steps)) + rng.uniform(0, 2 * np.pi)
            py = cy + np.cumsum(np.sin(turn)) * 1.5 * u
            px = cx + np.cumsum(np.cos(turn)) * 1.5 * u
            draw.line(list(zip(px * s, py * s)), fill=255, width=_width(0.9 * u, s), joint="curve")

    _paint(img, mask, 0.95 * _strokes(size, curves), colour, 5)


def _dirt(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    cy, cx = _point(rng, ctx["box"])
    field = _blob(rng, yy, xx, cy, cx, rng.uniform(0.08, 0.18) * size, 0.35)
    field = field + 0.5 * (_noise(rng, size, 8, 2) - 0.5)
    inside = field < 1.0
    grain = _noise(rng, size, size // 2)
    darkening = rng.uniform(0.5, 0.75) + 0.5 * (grain - 0.5)
    tint = _jitter(rng, (0.35, 0.34, 0.32), 0.03)
    dirty = img * darkening[..., None] * 0.7 + tint * darkening[..., None] * 0.3
    img[inside] = dirty[inside]
    mask[inside] = 6


def _fold(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    cy, cx = _point(rng, ctx["box"], 0.2)
    angle = rng.uniform(0, np.pi)
    across = (xx - cx) * -np.sin(angle) + (yy - cy) * np.cos(angle)
    half = rng.uniform(0.02, 0.045) * size
    t = across / half
    band = np.abs(t) < 1.0
    shade = 1.0 + rng.choice((-1, 1)) * 0.4 * np.clip(t, -1, 1) - 0.45 * np.exp(-(t * 4) ** 2)
    img *= np.where(band, shade, 1.0)[..., None]
    img[band] += 0.05
    # Paint wears off along the crease in small pale flecks.
    worn = (np.abs(t) < 0.45) & (_noise(rng, size, size // 3) > rng.uniform(0.5, 0.65))
    img[worn] = img[worn] * 0.4 + 0.55
    np.clip(img, 0, 1, out=img)
    mask[band] = 7


def _cursive_line(rng, x0, y0, length, height):
    """Polylines (one per word) of a handwritten line: a smooth curve through per-letter up/down strokes."""
    xs, ys, word = [], [], []
    x, w = x0, 0
    while x < x0 + length:
        pitch = height * rng.uniform(0.4, 0.9)
        tall = rng.uniform(0.35, 0.8) * (1.9 if rng.random() < 0.2 else 1.0)
        kind = rng.integers(3)
        if kind == 0:
            fx, fy = (0.1, 0.5, 0.9), (0.0, tall, 0.1)
        elif kind == 1:
            fx, fy = (0.1, 0.7, 0.2, 0.9), (0.0, tall, 0.5 * tall, 0.05)
        else:
            fx, fy = (0.1, 0.35, 0.6, 0.9), (0.0, tall, 0.1, 0.6 * tall)
        xs += [x + f * pitch for f in fx]
        ys += [y0 - f * height for f in fy]
        word += [w] * len(fx)
        x += pitch
        if rng.random() < 0.2:
            x += 0.6 * height
            w += 1
    xs, ys, word = np.array(xs), np.array(ys), np.array(word)
    xs -= 0.35 * (y0 - ys) * rng.uniform(0.3, 1.0)
    words = []
    for w in np.unique(word):
        px, py = xs[word == w], ys[word == w]
        if len(px) < 3:
            continue
        # Catmull-Rom through the control points, so strokes come out round rather than zigzag.
        p = np.stack([np.r_[px[0], px, px[-1]], np.r_[py[0], py, py[-1]]], 1)
        t = np.linspace(0, 1, 6)[:-1, None, None]
        p0, p1, p2, p3 = p[:-3], p[1:-2], p[2:-1], p[3:]
        curve = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                       + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3)
        words.append(np.concatenate([curve.transpose(1, 0, 2).reshape(-1, 2), p[-2:-1]]))
    return words


def _writing(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    # Ballpoint blue, faded iron-gall brown, pencil grey.
    inks = ((0.12, 0.16, 0.5), (0.38, 0.22, 0.1), (0.3, 0.3, 0.33))
    colour = _jitter(rng, inks[rng.integers(3)], 0.03)
    y0, x0, y1, x1 = ctx["box"]
    height = rng.uniform(4, 8) * u
    left = rng.uniform(x0, x0 + 0.5 * (x1 - x0))
    top = rng.uniform(y0 + 2 * height, y0 + 0.7 * (y1 - y0))
    width = rng.uniform(0.25, 0.5) * (x1 - x0)

    def lines(draw, s):
        for k in range(rng.integers(1, 4)):
            for word in _cursive_line(rng, left, top + k * 2.2 * height, width, height):
                if len(word) > 1:
                    draw.line([tuple(p) for p in word * s], fill=255,
                              width=_width(1.1 * u, s), joint="curve")

    _paint(img, mask, 0.95 * _strokes(size, lines), colour, 8)


def _cracks(rng, img, mask, ctx):
    yy, xx, size, u = ctx["yy"], ctx["xx"], ctx["size"], ctx["size"] / 128
    colour = _jitter(rng, (0.06, 0.05, 0.05), 0.02)
    cy, cx = _point(rng, ctx["box"])
    if rng.random() < 0.5:
        radius = rng.uniform(0.12, 0.25) * size
        ys = slice(max(0, int(cy - radius)), min(size, int(cy + radius) + 1))
        xs = slice(max(0, int(cx - radius)), min(size, int(cx + radius) + 1))
        warp = (_noise(rng, size, 6) - 0.5)[ys, xs] * 6 * u
        sy, sx = yy[ys, xs] + warp, xx[ys, xs] - warp
        cells = int(rng.integers(10, 30))
        py = cy + rng.uniform(-radius, radius, cells)
        px = cx + rng.uniform(-radius, radius, cells)
        # Craquelure: the edges of a warped Voronoi tiling, i.e. pixels near the bisector of their two nearest seeds.
        dist2 = (sy[..., None] - py) ** 2 + (sx[..., None] - px) ** 2
        two = np.argpartition(dist2, 1, axis=-1)[..., :2]
        d1, d2 = np.take_along_axis(dist2, two, -1).transpose(2, 0, 1)
        gap = np.maximum(np.hypot(py[two[..., 0]] - py[two[..., 1]], px[two[..., 0]] - px[two[..., 1]]), 1e-3)
        to_edge = np.abs(d2 - d1) / (2 * gap)
        region = _blob(rng, yy[ys, xs], xx[ys, xs], cy, cx, radius, 0.3)
        alpha = np.zeros((size, size), np.float32)
        alpha[ys, xs] = np.clip(1.2 - to_edge / (0.6 * max(u, 1.0)), 0, 1) * (region < 1.0)
    else:
        def branches(draw, s):
            stack = [(cy, cx, rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.4) * size)]
            drawn = 0
            while stack and drawn < 12:
                y, x, angle, length = stack.pop()
                steps = max(2, int(length / (2 * u)))
                turn = angle + np.cumsum(rng.normal(0, 0.25, steps))
                py = y + np.cumsum(np.sin(turn)) * 2 * u
                px = x + np.cumsum(np.cos(turn)) * 2 * u
                draw.line([(x * s, y * s)] + list(zip(px * s, py * s)), fill=255,
                          width=_width((1.5 if drawn == 0 else 0.9) * u, s))
                drawn += 1
                for k in rng.choice(steps, size=min(steps, 2), replace=False):
                    if rng.random() < 0.6 and length > 6 * u:
                        side = rng.choice((-1, 1)) * rng.uniform(0.4, 1.0)
                        stack.append((py[k], px[k], turn[k] + side, length * rng.uniform(0.3, 0.6)))

        alpha = _strokes(size, branches)
    _paint(img, mask, 0.95 * alpha, colour, 9)


def _staining(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    cy, cx = _point(rng, ctx["box"], 0.05)
    field = _blob(rng, yy, xx, cy, cx, rng.uniform(0.12, 0.25) * size, 0.3)
    field = field + 0.3 * (_noise(rng, size, 5) - 0.5)
    opacity = rng.uniform(0.55, 0.85)
    alpha = np.clip((1.15 - field) / 0.5, 0, 1) * opacity
    tide = np.exp(-((field - 0.97) / 0.05) ** 2) * 0.25
    colour = _jitter(rng, (0.72, 0.48, 0.14), 0.04)
    tint = 1.0 - alpha[..., None] * (1.0 - colour) - tide[..., None] * 0.5
    img *= tint
    mask[field < 1.0] = 10


def _stamp(rng, img, mask, ctx):
    yy, xx, size, u = ctx["yy"], ctx["xx"], ctx["size"], ctx["size"] / 128
    inks = ((0.8, 0.08, 0.12), (0.12, 0.2, 0.7), (0.5, 0.12, 0.6))
    colour = _jitter(rng, inks[rng.integers(3)], 0.04)
    cy, cx = _point(rng, ctx["box"])
    r = rng.uniform(0.07, 0.12) * size
    round_stamp = rng.random() < 0.6
    aspect = rng.uniform(0.6, 0.9)

    def shape(draw, s):
        box = (cx - r, cy - r, cx + r, cy + r) if round_stamp else (cx - r, cy - r * aspect, cx + r, cy + r * aspect)
        inner = 0.72
        w = _width(1.6 * u, s)
        big = tuple(v * s for v in box)
        small = tuple(s * (c + inner * (v - c)) for v, c in zip(box, (cx, cy, cx, cy)))
        if round_stamp:
            draw.ellipse(big, outline=255, width=w)
            draw.ellipse(small, outline=255, width=max(1, w // 2))
            for a in np.linspace(0, 2 * np.pi, rng.integers(8, 16), endpoint=False):
                rr = (0.86 * r) * s
                draw.line((cx * s + rr * np.cos(a), cy * s + rr * np.sin(a),
                           cx * s + rr * np.cos(a + 0.15), cy * s + rr * np.sin(a + 0.15)), fill=255, width=w // 2 + 1)
        else:
            draw.rectangle(big, outline=255, width=w)
            draw.rectangle(small, outline=255, width=max(1, w // 2))
        for k in range(rng.integers(1, 4)):
            y = cy + (k - 1) * 0.22 * r
            draw.line(((cx - 0.45 * r) * s, y * s, (cx + rng.uniform(0, 0.45) * r) * s, y * s), fill=255, width=w)

    texture = np.clip(0.3 + _noise(rng, size, size // 8, 2) * 1.2, 0, 1)
    alpha = _strokes(size, shape) * texture * rng.uniform(0.8, 1.0)
    if round_stamp:
        region = np.hypot(yy - cy, xx - cx) < r
    else:
        region = (np.abs(yy - cy) < r * aspect) & (np.abs(xx - cx) < r)
    # Ink smudges faintly across the whole pad area, not only along the engraved lines.
    alpha = np.maximum(alpha, region * texture * rng.uniform(0.2, 0.35))
    _composite(img, alpha, colour)
    mask[region] = 11


def _sticker(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    papers = ((0.96, 0.96, 0.94), (0.75, 0.85, 0.95), (0.8, 0.93, 0.78), (0.95, 0.78, 0.82), (0.72, 0.58, 0.42))
    colour = _jitter(rng, papers[rng.integers(len(papers))], 0.02)
    cy, cx = _point(rng, ctx["box"])
    h, w = rng.uniform(0.05, 0.12) * size, rng.uniform(0.08, 0.18) * size
    angle = rng.normal(0, 0.15)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) @ rot.T + (cx, cy)

    def rect(draw, s):
        draw.polygon([tuple(p) for p in corners * s], fill=255)

    def shadow(draw, s):
        draw.polygon([tuple(p) for p in (corners + 0.8 * u) * s], fill=255)

    img *= 1.0 - 0.35 * _strokes(size, shadow)[..., None]
    coverage = _strokes(size, rect)
    _paint(img, mask, coverage, colour, 12, threshold=0.5)
    text = _jitter(rng, (0.2, 0.2, 0.22), 0.03)

    def printed(draw, s):
        for k in range(rng.integers(0, 4)):
            y = -0.5 * h + k * 0.3 * h
            a = np.array([-0.7 * w, y]) @ rot.T + (cx, cy)
            b = np.array([rng.uniform(-0.3, 0.7) * w, y]) @ rot.T + (cx, cy)
            draw.line((a[0] * s, a[1] * s, b[0] * s, b[1] * s), fill=255, width=_width(u, s))

    _composite(img, 0.8 * _strokes(size, printed) * coverage, text)


def _puncture(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    hole = _jitter(rng, (0.05, 0.04, 0.04), 0.02)
    rim = _jitter(rng, (0.62, 0.52, 0.4), 0.05)
    cy, cx = _point(rng, ctx["box"])
    points = [(cy + rng.normal(0, 0.12 * size), cx + rng.normal(0, 0.12 * size), rng.uniform(1.5, 3.5) * u)
              for _ in range(rng.integers(1, 7))]

    def rims(draw, s):
        for y, x, r in points:
            rr = (r + 1.2 * u) * s
            draw.ellipse((x * s - rr, y * s - rr, x * s + rr, y * s + rr), fill=255)

    def holes(draw, s):
        for y, x, r in points:
            draw.ellipse(((x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s), fill=255)

    _paint(img, mask, _strokes(size, rims), rim, 13)
    _paint(img, mask, _strokes(size, holes), hole, 13)


def _burn(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    cy, cx = _point(rng, ctx["box"], 0.05)
    field = _blob(rng, yy, xx, cy, cx, rng.uniform(0.06, 0.14) * size, 0.4, 8)
    field = field + 0.4 * (_noise(rng, size, 10, 2) - 0.5)
    grain = _noise(rng, size, size // 3)
    char = np.clip(0.05 + 0.12 * grain, 0, 1)[..., None] * np.asarray((1.0, 0.8, 0.6), np.float32)
    scorch = _jitter(rng, (0.38, 0.22, 0.1), 0.03)
    core = np.clip((0.75 - field) / 0.25, 0, 1)[..., None]
    halo = np.clip((1.3 - field) / 0.55, 0, 1)[..., None]
    img[:] = img * (1 - halo) + scorch * halo
    img[:] = img * (1 - core) + char * core
    mask[field < 1.0] = 14


def _lightleak(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    y0, x0, y1, x1 = ctx["box"]
    edge = rng.integers(4)
    depth = (yy - y0, y1 - yy, xx - x0, x1 - xx)[edge] / size
    along = (xx, xx, yy, yy)[edge] / size
    scale = rng.uniform(0.05, 0.14) * (0.7 + 0.6 * np.exp(-((along - rng.uniform(0, 1)) / 0.35) ** 2))
    alpha = np.clip(rng.uniform(0.85, 1.1) * np.exp(-depth / scale), 0, 1)
    warm = np.stack([np.ones_like(alpha), 0.45 + 0.5 * (1 - alpha), 0.08 + 0.25 * (1 - alpha)], -1)
    img[:] = 1.0 - (1.0 - img) * (1.0 - alpha[..., None] * warm)
    img[:] = img * (1 - 0.5 * alpha[..., None]) + 0.5 * alpha[..., None] * warm
    mask[alpha >= 0.35] = 15


_PAINTERS = {1: _material_loss, 2: _peel, 3: _dust, 4: _scratch, 5: _hair, 6: _dirt, 7: _fold,
             8: _writing, 9: _cracks, 10: _staining, 11: _stamp, 12: _sticker, 13: _puncture,
             14: _burn, 15: _lightleak}


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
    colour = _jitter(rng, backdrops[rng.integers(len(backdrops))], 0.02)
    light = 0.85 + 0.15 * (1 - np.hypot(yy - size / 2, xx - size / 2) / size)
    backdrop = (light * (0.96 + 0.08 * _noise(rng, size, size // 4)))[..., None] * colour
    inset = 0.05 * size
    box = (margins[1] + inset, margins[0] + inset, size - margins[3] - inset, size - margins[2] - inset)
    return inside, tuple(float(v) for v in box), backdrop


def _render(index, size, seed):
    """One synthetic sample: (image uint8 (S,S,3), mask uint8 (S,S), material, content)."""
    rng = np.random.default_rng(seed * 1000 + index)
    material = SYNTHETIC_MATERIALS[index % len(SYNTHETIC_MATERIALS)]
    content = SYNTHETIC_CONTENTS[(index // len(SYNTHETIC_MATERIALS)) % len(SYNTHETIC_CONTENTS)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = _content(rng, size, content).astype(np.float32)
    _material(rng, img, material, yy, xx)
    mask = np.zeros((size, size), np.uint8)
    photographed = (index + seed) % 3 == 1
    box = (0.0, 0.0, float(size), float(size))
    if photographed:
        inside, box, backdrop = _outline(rng, size, yy, xx)
    # Two scheduled damage types per image (offsets vary by block so pairs do not always co-occur)
    # give every class ~2 images in 15; a random extra adds variety.
    kinds = len(_PAINTERS)
    first = (index + seed) % kinds
    second = (first + 3 + 5 * ((index // kinds) % 3)) % kinds
    chosen = {1 + first, 1 + second}
    others = [c for c in sorted(_PAINTERS) if c not in chosen]
    chosen.update(rng.choice(others, size=_EXTRA_DAMAGE[rng.integers(len(_EXTRA_DAMAGE))], replace=False).tolist())
    ctx = {"yy": yy, "xx": xx, "size": size, "box": box}
    for label in _DAMAGE_ORDER:
        if label in chosen:
            _PAINTERS[label](rng, img, mask, ctx)
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
