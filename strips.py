"""Images a strip of rows at a time, so memory does not grow with the image: PNG rows decoded and written in
strips, and the resampling of files.resize_image / resize_labels done strip by strip with exactly the result it
gives on the whole image.

Resizing follows Pillow's ``resize(BILINEAR, reducing_gap=3.0)``: a box reduction by an integer factor (a block
of rows at a time), then a horizontal pass (a strip at a time) and a vertical pass over an array at most about
six times the target size. Nearest-neighbour label maps follow Pillow's NEAREST sampling positions, so any strip
of rows can be cut from the small map directly.
"""
import struct
import zlib

import numpy as np
from PIL import Image

# Pillow's reducing_gap: shrink by an integer box factor first while the image stays 3x the target.
REDUCING_GAP = 3.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type (bit depth 8) -> Pillow mode and bytes per pixel.
PNG_MODES = {0: ("L", 1), 2: ("RGB", 3), 3: ("P", 1), 4: ("LA", 2), 6: ("RGBA", 4)}
# Rows per strip: about 16 MB of 4-byte pixels, whatever the width.
STRIP_BYTES = 1 << 24
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def reduce_factors(height, width, out_h, out_w):
    """(fy, fx): the integer box factors Pillow's resize applies before resampling (1 = none)."""
    return max(1, int(height / out_h / REDUCING_GAP)), max(1, int(width / out_w / REDUCING_GAP))


def strip_reducer(factors):
    """(add, finish) for consecutive row strips of a uint8 (H, W[, C]) image: add(rows) returns the rows of
    Pillow's reduce(factors) of the whole image that it completes (rows wait until a whole block of fy rows is
    there), finish() the rest; None where there are none. Concatenated they are the reduced image, pixel for
    pixel (a block's average depends on its own pixels alone)."""
    fy, fx = factors
    pending = []

    def reduce(rows):
        if not len(rows):
            return None
        if factors == (1, 1):
            return rows
        return np.asarray(Image.fromarray(np.ascontiguousarray(rows)).reduce((fx, fy)))

    def add(rows):
        joined = np.concatenate([*pending, rows]) if pending else rows
        cut = len(joined) - len(joined) % fy
        pending[:] = [joined[cut:]] if cut < len(joined) else []
        return reduce(joined[:cut])

    def finish():
        rest = pending[0] if pending else np.empty((0,))
        pending.clear()
        return reduce(rest)
    return add, finish


def strip_resizer(height, width, out_h, out_w):
    """(add, finish): add(rows) takes consecutive row strips of a uint8 (height, width, 3) image, finish() returns
    Pillow's resize((out_w, out_h), BILINEAR, reducing_gap=3.0) of the whole image, pixel for pixel: the same
    box reduction (made a block of rows at a time), then the same resampling call on the reduced image.

    Held meanwhile: the reduced image, at most about 6 x out_h by 6 x out_w pixels (an image under 6 times the
    target per side is not reduced, so it is held whole)."""
    fy, fx = reduce_factors(height, width, out_h, out_w)
    add_reduced, finish_reduced = strip_reducer((fy, fx))
    reduced = []

    def add(rows):
        reduced.append(add_reduced(rows))

    def finish():
        reduced.append(finish_reduced())
        whole = np.concatenate([part for part in reduced if part is not None])
        reduced.clear()
        if (height, width) == (out_h, out_w):
            return whole
        return np.asarray(Image.fromarray(whole).resize((out_w, out_h), Image.Resampling.BILINEAR,
                                                        box=(0, 0, width / fx, height / fy)))
    return add, finish


def nearest_positions(n_out, n_in):
    """Source index of each of n_out samples of n_in, as Pillow's NEAREST resize picks them: (i + 0.5) * n_in /
    n_out accumulated in float64 one step at a time and truncated (so any run of rows can be taken alone)."""
    steps = np.full(n_out, n_in / n_out)
    steps[0] /= 2
    return np.minimum(np.add.accumulate(steps).astype(np.int64), n_in - 1)


def png_layout(path):
    """(mode, width, height, bytes per pixel) of a PNG whose rows png_strips can stream (8-bit, not
    interlaced), else None."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if depth != 8 or interlace or colour not in PNG_MODES:
        return None
    return (*PNG_MODES[colour][:1], width, height, PNG_MODES[colour][1])


def _chunks(f, kind):
    """The data of every chunk of a kind, in file order, read a chunk at a time."""
    f.seek(len(PNG_SIGNATURE))
    while True:
        header = f.read(8)
        if len(header) < 8:
            raise ValueError("the file ends before its IEND chunk (truncated)")
        length, name = struct.unpack(">I4s", header)
        if name == b"IEND":
            return
        if name == kind:
            data = f.read(length)
            if len(data) < length:
                raise ValueError("the file ends inside a chunk (truncated)")
            yield data
            f.seek(4, 1)
        else:
            f.seek(length + 4, 1)


def _inflated(chunks, size):
    """The zlib stream split over chunks, inflated and cut into pieces of size bytes (the last one shorter);
    the output is limited per call, so a highly compressed chunk never expands whole."""
    inflate, buffer = zlib.decompressobj(), bytearray()
    for data in chunks:
        while data:
            buffer += inflate.decompress(data, size)
            data = inflate.unconsumed_tail
            while len(buffer) >= size:
                yield bytes(buffer[:size])
                del buffer[:size]
    buffer += inflate.flush()
    if buffer:
        yield bytes(buffer)


def png_strips(path, rows, template):
    """PIL images of consecutive strips of up to rows rows of the PNG at path (one png_layout accepts), in its
    mode, with the palette and transparency of template (the file opened by Pillow), pixel for pixel what
    Pillow decodes whole. Each strip goes through Pillow's own PNG row decoder, preceded by the row above it
    unfiltered, which is all the PNG filters of a row refer to."""
    mode, width, height, channels = png_layout(path)
    row_bytes = 1 + width * channels
    above, done = b"", 0
    with open(path, "rb") as f:
        for filtered in _inflated(_chunks(f, b"IDAT"), rows * row_bytes):
            n = min(len(filtered) // row_bytes, height - done)
            if n <= 0:
                break
            data = (b"\0" + above if above else b"") + filtered[:n * row_bytes]
            strip = Image.frombytes(mode, (width, n + bool(above)), zlib.compress(data, 0), "zip", mode)
            if above:
                strip = strip.crop((0, 1, width, n + 1))
            above = strip.crop((0, n - 1, width, n)).tobytes()
            if template.palette is not None and mode == "P":
                strip.putpalette(template.getpalette())
            strip.info = dict(template.info)
            done += n
            yield strip
    if done < height:
        raise ValueError(f"the image data ends after {done} of {height} rows (truncated)")


def write_png(file, width, height, strips, palette=None, level=6):
    """A PNG of 8-bit rows written to an open binary file as the strips come: greyscale (or indexed, with
    palette: 256 x 3 uint8 colours) for (n, width) strips, RGB for (n, width, 3). Every row is unfiltered
    (label maps compress best that way) and compressed at once, so only one strip is held."""
    def chunk(kind, data):
        file.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))

    deflate, written, colour = zlib.compressobj(level), 0, None
    for rows in strips:
        if colour is None:
            colour = 2 if rows.ndim == 3 else 3 if palette is not None else 0
            file.write(PNG_SIGNATURE)
            chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
            if colour == 3:
                chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
        rows = np.ascontiguousarray(rows, np.uint8).reshape(len(rows), -1)
        filtered = np.zeros((len(rows), rows.shape[1] + 1), np.uint8)
        filtered[:, 1:] = rows
        data = deflate.compress(filtered.tobytes())
        if data:
            chunk(b"IDAT", data)
        written += len(rows)
    if written != height:
        raise ValueError(f"write_png: {written} rows given for a {height}-row image")
    chunk(b"IDAT", deflate.flush())
    chunk(b"IEND", b"")


def strip_rows(width):
    """Rows per strip for an image this wide."""
    return max(1, STRIP_BYTES // (4 * max(width, 1)))


def _source_box(orientation, width, height, r0, r1):
    """The box of the stored image (width x height) that rows r0..r1 of the upright image come from."""
    if orientation in (1, 2):
        return 0, r0, width, r1
    if orientation in (3, 4):
        return 0, height - r1, width, height - r0
    if orientation in (5, 6):
        return r0, 0, r1, height
    return width - r1, 0, width - r0, height


def exif_orientation(image):
    """The EXIF orientation (1-8; 1 = upright) of an opened image, from its header alone: Pillow's getexif()
    decodes a whole PNG to look for an eXIf chunk after the pixels, so a PNG's chunks are scanned instead."""
    if image.format != "PNG":
        return image.getexif().get(EXIF_ORIENTATION, 1)
    position = image.fp.tell()
    data = next(_chunks(image.fp, b"eXIf"), None)
    image.fp.seek(position)
    if data is None:
        return 1
    exif = Image.Exif()
    exif.load(data)
    return exif.get(EXIF_ORIENTATION, 1)


def upright_strips(path, image, orient=True, rows=None):
    """PIL images of consecutive strips of rows rows (default strip_rows) of an opened image as displayed
    (orient: its EXIF orientation applied, as ImageOps.exif_transpose does; else as stored). A PNG png_layout
    accepts, stored upright, is
    decoded a strip at a time; anything else is decoded whole by Pillow and cut into strips (each strip cut
    from the stored image and turned upright on its own)."""
    orientation = exif_orientation(image) if orient else 1
    orientation = orientation if orientation in UPRIGHT else 1
    width, height = image.size
    rows = rows or strip_rows(width if orientation < 5 else height)
    if image.format == "PNG" and orientation == 1 and png_layout(path):
        yield from png_strips(path, rows, image)
        return
    image.load()
    upright_h = width if orientation >= 5 else height
    for r0 in range(0, upright_h, rows):
        strip = image.crop(_source_box(orientation, width, height, r0, min(r0 + rows, upright_h)))
        yield strip.transpose(UPRIGHT[orientation]) if orientation != 1 else strip
