"""Damage overlays for the eye: each damage region blended over the photograph at half strength in its class
colour and outlined in full colour, outside-object pixels in the scheme's ignore colour, and a legend of the
classes found with their share of the object (and area in mm² when the scale is known). Outlines and legend
grow with the overlay, so a 24 MP overlay viewed at screen size still shows its outlines and can be read."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from labels import colour_table

ROWS_PER_CHUNK = 512
# One outline pixel per this many pixels of the long side (1 px up to 1,200 px): about 2 screen pixels when an
# overlay is viewed downscaled to fit a screen.
OUTLINE_PER_PIXELS = 800


def blend(image, labels, scheme, alpha=0.5, edges=None):
    """Image with every non-clean pixel mixed with its class colour (the scheme's; the ignore colour outside the
    object): round((1-alpha)*pixel + alpha*colour); pixels of ``edges`` (a class id per pixel, -1 for none) get
    that class's full colour instead."""
    colours = colour_table(scheme)
    out = image.copy()
    marked = labels != scheme.clean
    mixed = image[marked] * np.float32(1 - alpha) + colours[labels[marked]] * np.float32(alpha)
    out[marked] = np.rint(mixed).astype(np.uint8)
    if edges is not None:
        drawn = edges >= 0
        out[drawn] = colours[edges[drawn]]
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


def outline_width(height, width):
    """Outline width (px) of an overlay this size: 1 px up to 1,200 px on the long side, then 1 per 800 px."""
    return max(1, round(max(height, width) / OUTLINE_PER_PIXELS))


def outline_ids(labels, scheme, width):
    """Class id of the outline drawn at each pixel (-1: none): region borders (region_edges) widened to
    ``width`` px (a square of side width centred on each border pixel; where two outlines meet, the higher id)."""
    ids = np.where(region_edges(labels, scheme), labels.astype(np.int16), np.int16(-1))
    radius = (width - 1) // 2
    for axis in (0, 1):
        grown = ids.copy()
        for shift in range(1, radius + 1):
            ahead, behind = [slice(None)] * 2, [slice(None)] * 2
            ahead[axis], behind[axis] = slice(shift, None), slice(None, -shift)
            np.maximum(grown[tuple(ahead)], ids[tuple(behind)], out=grown[tuple(ahead)])
            np.maximum(grown[tuple(behind)], ids[tuple(ahead)], out=grown[tuple(behind)])
        ids = grown
    return ids


def percent_text(value):
    """A share of the object for the eye: two decimals, and "<0.01 %" rather than "0.00 %"."""
    return "<0.01 %" if value < 0.01 else f"{value:.2f} %"


def area_text(mm2):
    """An area in mm² for the eye: two decimals up to 100 mm², then whole mm² with thousands separated."""
    if mm2 < 0.01:
        return "<0.01 mm²"
    return f"{mm2:.2f} mm²" if mm2 < 100 else f"{mm2:,.0f} mm²"


def legend_entries(report, outside, scheme):
    """(colour or None, text) lines of the legend: the damaged share of the object (no swatch), each damage class
    found, then the outside-object colour. The clean class gets no swatch, and a class under 0.01 % of the object
    reads "<0.01 %" rather than "0.00 %"; areas in mm² follow where the report has them."""
    def text(name, percent, mm2):
        return f"{name} {percent_text(percent)}" + ("" if mm2 is None else f" · {area_text(mm2)}")
    entries = [(None, text("Damaged", report["damaged_percent"], report.get("damaged_mm2")))]
    entries += [(scheme.colours[c["id"]], text(c["name"], c["percent"], c.get("mm2"))) for c in report["classes"]
                if c["pixels"] and c["id"] != scheme.clean]
    if outside:
        entries.append((scheme.ignore_colour, "Outside object"))
    return entries


def text_runs(text):
    """(part, raised) pieces of a legend text: Pillow's built-in font has no "²", so "mm²" is drawn as "mm" and
    a raised, smaller "2"."""
    return [(part, raised) for piece in text.split("²") for part, raised in ((piece, False), ("2", True))][:-1]


def _text_length(font, small, text):
    return sum((small if raised else font).getlength(part) for part, raised in text_runs(text))


def _draw_text(draw, x, y, text, font, small):
    for part, raised in text_runs(text):
        # Both fonts hang from the same top line, so the smaller "2" sits raised.
        draw.text((x, y), part, fill=(0, 0, 0), font=small if raised else font)
        x += (small if raised else font).getlength(part)


def legend(width, report, outside, scheme):
    """The legend strip for an overlay ``width`` px wide (wider where one entry needs more); its font is 1/100
    of the width (at least 12 px)."""
    entries = legend_entries(report, outside, scheme)
    size = max(12, width // 100)
    font, small = ImageFont.load_default(size=size), ImageFont.load_default(size=max(8, size * 2 // 3))
    pad, line = size // 2, size + size // 2
    widths = [(size + pad if colour is not None else 0) + int(_text_length(font, small, text)) + 2 * pad
              for colour, text in entries]
    width = max(width, pad + max(widths))
    placed, x, y = [], pad, pad
    for (colour, text), entry_w in zip(entries, widths):
        if x > pad and x + entry_w > width:
            x, y = pad, y + line
        placed.append((x, y, colour, text))
        x += entry_w
    strip = Image.new("RGB", (width, y + line + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, colour, text in placed:
        if colour is not None:
            draw.rectangle((x, y, x + size - 1, y + size - 1), fill=tuple(int(v) for v in colour),
                           outline=(128, 128, 128))
            x += size + pad
        _draw_text(draw, x, y, text, font, small)
    return strip


def render_overlay(image, labels, report, scheme, alpha=0.5):
    """The image with damage (and outside-object pixels) blended in the scheme's colours, each damage region
    outlined in its full colour (outline_width), a legend strip below it."""
    height, width = labels.shape
    thickness = outline_width(height, width)
    strip = legend(width, report, bool((labels == scheme.ignore).any()), scheme)
    canvas = Image.new("RGB", (strip.width, height + strip.height), (255, 255, 255))
    halo = (thickness - 1) // 2 + 1
    for r0 in range(0, height, ROWS_PER_CHUNK):
        r1 = min(r0 + ROWS_PER_CHUNK, height)
        # Halo rows above and below, so that outlines do not depend on where the chunks are cut.
        h0, h1 = max(r0 - halo, 0), min(r1 + halo, height)
        edges = outline_ids(labels[h0:h1], scheme, thickness)[r0 - h0:r1 - h0]
        canvas.paste(Image.fromarray(blend(image[r0:r1], labels[r0:r1], scheme, alpha, edges)), (0, r0))
    canvas.paste(strip, (0, height))
    return canvas
