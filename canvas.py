"""Painting helpers of the synthetic set: value noise, irregular blobs, antialiased strokes, compositing (paint
also labels the pixels it covers), and the artwork under the damage (its picture and its support's texture)."""
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Strokes are drawn at this multiple of the output size and box-filtered down, so thin lines stay antialiased.
_SUPERSAMPLE = 2


def noise(rng, size, cells, octaves=1):
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


def blob(rng, grid, centre, radius, roughness=0.25, harmonics=6):
    """Normalised distance to an irregular blob outline around centre (y, x) at the points of grid (yy, xx):
    < 1 inside, grows outwards."""
    (yy, xx), (cy, cx) = grid, centre
    dy, dx = yy - cy, xx - cx
    angle = np.arctan2(dy, dx)
    outline = np.ones_like(angle)
    for h in range(1, harmonics + 1):
        outline += roughness * rng.normal() / h * np.cos(h * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) / (radius * np.maximum(outline, 0.35))


def strokes(size, draw_fn):
    """Antialiased coverage in [0, 1] of whatever draw_fn paints (at 2x, scale given) on a blank layer."""
    big = size * _SUPERSAMPLE
    layer = Image.new("L", (big, big), 0)
    draw_fn(ImageDraw.Draw(layer), _SUPERSAMPLE)
    small = layer.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def stroke_width(pixels, scale):
    """Stroke width on the supersampled layer: never thinner than one output pixel, so thin damage stays labelled."""
    return max(scale, int(round(pixels * scale)))


def composite(img, alpha, colour):
    """Blend colour (RGB triple or per-pixel array) over img in place with per-pixel opacity alpha."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(colour, np.float32)


def paint(img, mask, alpha, colour, label, threshold=0.4):
    """Composite colour and label the pixels whose coverage passes threshold."""
    composite(img, alpha, colour)
    mask[alpha >= threshold] = label


def point_in(rng, box, pad=0.15):
    y0, x0, y1, x1 = box
    return (rng.uniform(y0 + pad * (y1 - y0), y1 - pad * (y1 - y0)),
            rng.uniform(x0 + pad * (x1 - x0), x1 - pad * (x1 - x0)))


def jitter(rng, colour, amount=0.05):
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
    img *= (0.9 + 0.2 * noise(rng, size, 4, 3))[..., None]
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
    return np.asarray(img, np.float32) / 255.0 * (0.92 + 0.16 * noise(rng, size, 6, 2))[..., None]


def _line_art(rng, size, u):
    """Ink drawing on a pale ground: outlined ellipses and hatching."""
    ground = jitter(rng, (0.92, 0.89, 0.82), 0.03)
    img = np.empty((size, size, 3), np.float32)
    img[:] = ground
    ink = jitter(rng, (0.12, 0.09, 0.07) if rng.random() < 0.6 else (0.35, 0.22, 0.12), 0.03)

    def draw_lines(draw, s):
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size * s
            ry, rx = rng.uniform(0.06, 0.3, 2) * size * s
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), outline=255, width=stroke_width(u, s))
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size * s
            half, gap = rng.uniform(0.05, 0.15) * size * s, rng.uniform(2.5, 4.5) * u * s
            angle = rng.uniform(0, np.pi)
            d = np.array([np.cos(angle), np.sin(angle)]) * half
            for k in range(int(2 * half / gap)):
                off = (k * gap - half) * np.array([-np.sin(angle), np.cos(angle)])
                draw.line((cx + off[0] - d[0], cy + off[1] - d[1], cx + off[0] + d[0], cy + off[1] + d[1]),
                          fill=255, width=stroke_width(u, s))

    composite(img, 0.9 * strokes(size, draw_lines), ink)
    return img


def artwork(rng, size, content):
    """The picture itself, before the material texture: float RGB (S, S, 3) in [0, 1]."""
    colours = _muted_palette(rng, 6)
    u = size / 128
    if content == "Artistic depiction":
        return _artistic(rng, size, colours, u)
    if content == "Geometric patterns":
        return _geometric(rng, size, colours, u)
    return _line_art(rng, size, u)


def apply_material(rng, img, material, yy, xx):
    """Apply the support's texture (paper fibres, canvas weave, mosaic tiles, parchment blotches)."""
    size = img.shape[0]
    u = size / 128
    if material == "Paper":
        fibres = noise(rng, size, max(4, size // 3))
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
        tiles[grout] = jitter(rng, (0.55, 0.53, 0.5), 0.04)
        img[:] = tiles
    else:
        blotch = noise(rng, size, 3, 3)
        img *= np.asarray((1.0, 0.93, 0.78), np.float32) * (0.85 + 0.25 * blotch)[..., None]
    np.clip(img, 0, 1, out=img)
