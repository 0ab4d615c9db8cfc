"""Images a strip at a time give exactly what they give whole: PNG rows decoded and written in strips, Pillow's
resampling reproduced strip by strip, EXIF orientation applied per strip, resolution read from the header."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

import files
from strips import PNG_SIGNATURE, nearest_positions, png_strips, strip_resizer, write_png

RNG = np.random.default_rng(42)


def _paeth(a, b, c):
    p = a.astype(np.int64) + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_rows(raw, bpp, filters):
    """PNG scanlines of raw (H, row bytes) rows, row y filtered with filters[y] (0 none .. 4 Paeth), as the PNG
    specification defines each filter from the unfiltered neighbours (vectorised: encoding needs no recurrence)."""
    out, above = [], np.zeros(raw.shape[1], np.int64)
    for row, kind in zip(raw.astype(np.int64), filters):
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        corner = np.concatenate([np.zeros(bpp, np.int64), above[:-bpp]])
        predicted = [0, left, above, (left + above) // 2, _paeth(left, above, corner)][kind]
        out.append(bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
        above = row
    return b"".join(out)


def png_file(path, raw, width, colour, bpp, filters, extra=(), idat_size=3000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    data = zlib.compress(filtered_rows(raw, bpp, filters), 9)
    parts = [PNG_SIGNATURE, chunk(b"IHDR", struct.pack(">IIBBBBB", width, len(raw), 8, colour, 0, 0, 0))]
    parts += [chunk(kind, payload) for kind, payload in extra]
    parts += [chunk(b"IDAT", data[i:i + idat_size]) for i in range(0, len(data), idat_size)]
    path.write_bytes(b"".join(parts + [chunk(b"IEND", b"")]))


@pytest.mark.parametrize("colour,bpp", [(0, 1), (2, 3), (3, 1), (4, 2), (6, 4)])
def test_png_rows_decoded_in_strips_equal_pillows_whole_decode_for_every_filter(tmp_path, colour, bpp):
    for trial in range(3):
        height, width = (int(v) for v in RNG.integers(1, 120, 2))
        raw = RNG.integers(0, 256, (height, width * bpp), dtype=np.uint8)
        raw[: height // 2] //= 16
        extra = []
        if colour == 3:
            extra = [(b"PLTE", RNG.integers(0, 256, (256, 3), dtype=np.uint8).tobytes()),
                     (b"tRNS", RNG.integers(0, 256, 40, dtype=np.uint8).tobytes())]
        path = tmp_path / f"p{trial}.png"
        png_file(path, raw, width, colour, bpp, RNG.integers(0, 5, height), extra)
        with Image.open(path) as whole:
            whole.load()
            strips = list(png_strips(path, int(RNG.integers(1, 40)), whole))
            assert {s.mode for s in strips} == {whole.mode}
            np.testing.assert_array_equal(np.concatenate([np.asarray(s) for s in strips]), np.asarray(whole))
            if colour == 3:
                np.testing.assert_array_equal(np.concatenate([np.asarray(s.convert("RGBA")) for s in strips]),
                                              np.asarray(whole.convert("RGBA")))


def test_a_truncated_png_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(RNG.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(files.UserError, match="cut.png: not a readable image"):
        list(files.image_strips(path))


@pytest.mark.parametrize("shape,palette", [((37, 51), True), ((300, 7, 3), False), ((1, 1), False)])
def test_png_written_a_strip_at_a_time_reads_back_unchanged(shape, palette):
    pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
    colours = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    write_png(buffer, shape[1], shape[0], (pixels[r:r + 10] for r in range(0, shape[0], 10)),
              colours if palette else None)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode == ("P" if palette else "RGB" if len(shape) == 3 else "L")
    np.testing.assert_array_equal(np.asarray(image), pixels)
    if palette:
        np.testing.assert_array_equal(np.array(image.getpalette()).reshape(-1, 3), colours)


def test_resizing_in_strips_equals_pillows_bilinear_resize_of_the_whole_image():
    for trial in range(120):
        height, width = (int(v) for v in RNG.integers(1, 1300, 2))
        out_h, out_w = (int(v) for v in RNG.integers(1, 250, 2))
        if trial % 6 == 0:
            out_h, out_w = height, width
        pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
        add, finish = strip_resizer(height, width, out_h, out_w)
        row = 0
        while row < height:
            step = int(RNG.integers(1, 150))
            add(pixels[row:row + step])
            row += step
        expected = Image.fromarray(pixels).resize((out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
        np.testing.assert_array_equal(finish(), np.asarray(expected), err_msg=f"{height}x{width} -> {out_h}x{out_w}")


def test_nearest_positions_are_pillows_nearest_resize():
    for _ in range(300):
        n_in, n_out = int(RNG.integers(1, 256)), int(RNG.integers(1, 4000))
        ramp = np.arange(n_in, dtype=np.uint8)[None]
        expected = np.asarray(Image.fromarray(ramp).resize((n_out, 1), Image.Resampling.NEAREST))[0]
        np.testing.assert_array_equal(nearest_positions(n_out, n_in), expected)
        np.testing.assert_array_equal(files.resize_labels(np.repeat(ramp, 3, 0), 5, n_out)[0], expected)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_strips_of_a_photo_with_an_exif_orientation_are_the_upright_image(tmp_path, suffix, orientation):
    path = tmp_path / f"photo{suffix}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(RNG.integers(0, 256, (70, 45, 3), dtype=np.uint8)).save(path, exif=exif)
    with Image.open(path) as image:
        upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_array_equal(np.concatenate(list(files.image_strips(path))), upright)
    assert files.image_header(path)[:2] == upright.shape[:2]


@pytest.mark.parametrize("orientation,shown", [(None, (70, 45)), (6, (45, 70))])
def test_a_pngs_size_and_orientation_are_read_from_its_header_without_decoding_its_pixels(tmp_path, orientation,
                                                                                          shown):
    # Pillow's getexif() decodes a whole PNG that has no EXIF before its pixels (1.2 GB held for a moment at
    # 400 MP): with its pixel data broken, the header still reads, and only decoding the rows fails.
    path = tmp_path / "turned.png"
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(RNG.integers(0, 256, (70, 45, 3), dtype=np.uint8)).save(path, exif=exif)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 100:start + 400] = bytes(300)
    path.write_bytes(bytes(data))
    assert files.image_header(path)[:2] == shown and files.displayed_size(path) == shown
    with pytest.raises(files.UserError, match="turned.png: not a readable image"):
        list(files.image_strips(path))


def test_an_rgba_image_keeps_its_alpha_as_a_fourth_channel(tmp_path):
    pixels = RNG.integers(0, 256, (30, 20, 4), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "logo.png")
    np.testing.assert_array_equal(np.concatenate(list(files.image_strips(tmp_path / "logo.png"))), pixels)
    assert files.image_header(tmp_path / "logo.png").alpha
    Image.fromarray(pixels[..., :3]).save(tmp_path / "plain.png")
    assert not files.image_header(tmp_path / "plain.png").alpha


def test_the_header_gives_the_resolution_in_dots_per_inch_whatever_unit_the_file_uses(tmp_path):
    pixels = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png", dpi=(300, 300))
    Image.fromarray(pixels).save(tmp_path / "a.tif", dpi=(600, 400))
    # A TIFF in dots per centimetre (ResolutionUnit 3): 100 per cm is 254 per inch.
    Image.fromarray(pixels).save(tmp_path / "cm.tif", tiffinfo={282: 100.0, 283: 100.0, 296: 3})
    Image.fromarray(pixels).save(tmp_path / "none.png")
    assert files.image_header(tmp_path / "a.png").dpi == pytest.approx((300, 300), abs=0.01)
    assert files.image_header(tmp_path / "a.tif").dpi == pytest.approx((600, 400))
    assert files.image_header(tmp_path / "cm.tif").dpi == pytest.approx((254, 254))
    assert files.image_header(tmp_path / "none.png").dpi is None
