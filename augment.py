"""Training augmentation beyond flips: each crop's scale and its colours, drawn from (seed, epoch) alone and applied
to whole batches in tensor ops.

- Scale: a crop at scale s is the window of side img_size / s of a working-resolution row, resized to img_size
  (images bilinear, area-like when shrinking; masks nearest; outside the row, images are 0 and masks the label
  scheme's ignore id).
  Nothing is decoded again.
- Photometric distortion: brightness, contrast, saturation and hue make one 3x3 colour map per image, applied
  with the normalisation in one pass; a share of the images is then blurred. Masks are never touched by it.

Every parameter of a row comes from numpy generators seeded with [seed, epoch, stream], so any number of ranks
and a resumed run see the same crops.
"""
import collections
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# Streams of np.random.default_rng([seed, epoch, stream]); 2 draws the crop positions (data.epoch_crops).
SCALE_STREAM, PHOTOMETRIC_STREAM = 3, 4
# --scale-aug bounds: beyond them a crop is mostly padding (zoomed out) or a few blurred pixels (zoomed in).
SCALE_LIMITS = (0.25, 4.0)
# Blur sigmas (working-resolution pixels): torchvision GaussianBlur's default range.
BLUR_SIGMA = (0.1, 2.0)
# ITU-R 601 luma (torchvision's grayscale rounds the red weight to 0.2989) and the YIQ matrix whose chroma plane
# the hue shift rotates.
GREY = np.array([0.299, 0.587, 0.114])
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
# Columns of photometric_params.
BRIGHTNESS, CONTRAST, SATURATION, HUE, SIGMA = range(5)


def crop_sides(n, size, scale, seed, epoch):
    """(n,) window sides in working pixels: size / s for a scale s drawn log-uniformly from scale = (lo, hi) per
    row (as often zoomed in as out), or size everywhere when scale is None."""
    if not scale:
        return np.full(n, size, np.int64)
    rng = np.random.default_rng([seed, epoch, SCALE_STREAM])
    factors = np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]), n))
    return np.rint(size / factors).astype(np.int64)


def photometric_params(n, colour, blur, seed, epoch):
    """(n, 5) float64 per row: brightness, contrast and saturation factors from [1 - colour, 1 + colour], a hue
    shift from [-colour / 4, colour / 4] of a turn (torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1) at colour 0.4),
    and a blur sigma from BLUR_SIGMA for a share blur of the rows (0: not blurred); None when both are off."""
    if not colour and not blur:
        return None
    draws = np.random.default_rng([seed, epoch, PHOTOMETRIC_STREAM]).random((n, 6))
    params = np.empty((n, 5))
    params[:, :3] = 1 + colour * (2 * draws[:, :3] - 1)
    params[:, HUE] = colour / 4 * (2 * draws[:, 3] - 1)
    params[:, SIGMA] = np.where(draws[:, 4] < blur, BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * draws[:, 5], 0)
    return params


def window(array, top, left, side, fill):
    """The side x side window of array at (top, left): a view when it lies inside, else a copy filled with fill
    where it leaves the array."""
    height, width = array.shape[:2]
    if top >= 0 and left >= 0 and top + side <= height and left + side <= width:
        return array[top:top + side, left:left + side]
    out = np.full((side, side) + array.shape[2:], fill, array.dtype)
    y0, y1, x0, x1 = max(top, 0), min(top + side, height), max(left, 0), min(left + side, width)
    if y0 < y1 and x0 < x1:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = array[y0:y1, x0:x1]
    return out


def nearest_index(side, size):
    """The source pixel (of side) under the centre of each of size output pixels, in integer arithmetic, so
    every device picks the same labels."""
    return (2 * np.arange(size) + 1) * side // (2 * size)


def resize_pixels(window, size, out=None):
    """uint8 (side, side, 3) tensor -> (size, size, 3): bilinear with half-pixel centres and, when shrinking, a
    filter as wide as the scale (an area-like average, Pillow's BILINEAR up to rounding); torch's fixed-point
    uint8 kernel on the CPU (as resize_window), float32 rounded on a GPU, which has no uint8 kernel (one level
    off at some pixels). out: on the CPU, a (size, size, 3) uint8 tensor to write the pixels into."""
    pixels = window.permute(2, 0, 1)[None]
    if pixels.device.type == "cpu":
        out = torch.empty((size, size, 3), dtype=torch.uint8) if out is None else out
        # F.interpolate returns planes whatever the input's layout; the kernel's out= form writes whole pixels
        # into out directly, the same bytes 2-3x faster than planes and a copy into pixels.
        torch.ops.aten._upsample_bilinear2d_aa.out(pixels, [size, size], False, None, None,
                                                   out=out.permute(2, 0, 1)[None])
        return out
    resized = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return resized[0].permute(1, 2, 0)  # NHWC view of the kernel's NCHW output


def resize_window(image, mask, size, out):
    """A (side, side, 3) image window and its (side, side) mask -> (the image resized into out, a (size, size, 3)
    uint8 array, by resize_pixels; the mask (size, size), nearest by nearest_index). numpy in, numpy out."""
    rows = nearest_index(len(mask), size)
    if not image.flags.writeable:
        image = image.copy()  # torch refuses to wrap the read-only shared buffer
    resize_pixels(torch.from_numpy(image), size, torch.from_numpy(out))
    return out, mask[rows][:, rows]


# The preloaded rows as tensors on a device: pixels (P, 3) and labels (P,) uint8, every row's first pixel and shape,
# and the label scheme's ignore id (the masks' fill off the rows).
DeviceRows = collections.namedtuple("DeviceRows", "pixels labels starts shapes ignore")


def device_rows(pre, device):
    """pre's rows (a preload.Preloaded) on device without a copy on the CPU. Image and mask bytes share one pixel
    numbering (both are laid out back to back in row order), so one index reads either."""
    layout = pre.layout
    first_mask, end = int(layout.mask_offsets[0]) if len(pre) else 0, int(layout.counts_offset)
    with warnings.catch_warnings():
        # The shared buffer is mapped read-only; nothing here writes to it.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(pre.buffer[:end])
    pixels = flat[:first_mask].view(-1, 3)
    labels = flat[first_mask:first_mask + len(pixels)]
    starts = torch.from_numpy(np.asarray(layout.image_offsets, np.int64) // 3)
    return DeviceRows(pixels.to(device), labels.to(device), starts.to(device),
                      torch.from_numpy(np.asarray(pre.shapes, np.int64)).to(device), pre.scheme.ignore)


def device_crops(rows, indices, corners, sides, size):
    """(images (B, size, size, 3), masks (B, size, size)) uint8 on rows' device: each row's window at corners with
    sides, as the host cuts them (preload.gather): masks by index arithmetic over the whole batch at once, images
    too where the window has side size; other windows are cut the same way and resized one by one
    (resize_pixels: on the CPU the host's kernel, so the crops are the host's bit for bit)."""
    device = rows.pixels.device
    indices = torch.as_tensor(indices, device=device)
    corners = torch.as_tensor(corners, device=device)
    sides = np.asarray(sides, np.int64)
    height, width = rows.shapes[indices, 0, None], rows.shapes[indices, 1, None]
    start, top, left = rows.starts[indices, None, None], corners[:, 0, None], corners[:, 1, None]

    def read(ys, xs, source, fill, at=slice(None)):
        """source at window rows ys (B, n) and columns xs (B, n) of the rows at; fill outside the row."""
        ys, xs = ys + top[at], xs + left[at]
        h, w = height[at], width[at]
        inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
        ys, xs = torch.minimum(ys.clamp(min=0), h - 1), torch.minimum(xs.clamp(min=0), w - 1)
        values = source[start[at] + (ys * w)[:, :, None] + xs[:, None, :]]
        return torch.where(inside[..., None] if values.dim() == 4 else inside, values, fill)

    near = torch.as_tensor(nearest_index(sides[:, None], size), device=device)
    masks = read(near, near, rows.labels, rows.ignore)
    images = read(near, near, rows.pixels, 0)
    for j in np.flatnonzero(sides != size).tolist():
        span = torch.arange(int(sides[j]), device=device)[None]
        images[j] = resize_pixels(read(span, span, rows.pixels, 0, slice(j, j + 1))[0], size)
    return images, masks


def colour_maps(params):
    """(B, 3, 3) float64 colour maps A and (B,) offset factors k of the rows' photometric params: an image u
    (0-255) becomes A u + k * g, g its mean grey level. In order: brightness b (u -> b u), contrast c (towards
    the mean grey: c u + (1 - c) mean), saturation s (towards the pixel's grey), hue h (a rotation of the YIQ
    chroma plane by h turns, the linear counterpart of torchvision's HSV shift). Saturation and hue keep greys
    grey, so the contrast offset passes through them unchanged."""
    b, c, s, h = (params[:, k, None, None] for k in (BRIGHTNESS, CONTRAST, SATURATION, HUE))
    saturation = s * np.eye(3) + (1 - s) * GREY[None, None, :]
    angle = 2 * np.pi * h[:, 0, 0]
    rotation = np.zeros((len(params), 3, 3))
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1] = rotation[:, 2, 2] = np.cos(angle)
    rotation[:, 1, 2], rotation[:, 2, 1] = -np.sin(angle), np.sin(angle)
    hue = np.linalg.inv(YIQ) @ rotation @ YIQ
    return c * b * hue @ saturation, (1 - c[:, 0, 0]) * b[:, 0, 0]


# A pixel's three outputs read its own three bytes of the interleaved RGB stream, at offsets -2..2 from each
# output's place: five shifted multiply-adds with taps that repeat every pixel, a pass of contiguous loads that a
# compiled loop vectorises (a 3 x 3 product per pixel is too small for a matrix kernel, and broadcasting over an
# innermost 3 keeps the lanes empty). The stream carries STREAM_MARGIN bytes either side for the first and last
# pixel's shifted reads, whose taps there are 0.
SHIFTS, STREAM_MARGIN = 5, 2
# Pixels a row of the passes takes: the largest of these that divides an image's pixel count.
LANE_PIXELS = (16, 8, 4, 2, 1)
# Compiled passes by function; None: True once compiling failed.
_COMPILED = {}


def colour_normalize(images_u8, params, mean, std, out=None):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), NHWC in memory: each image's colour map (colour_maps) and the
    normalisation by mean and std folded into one affine map per image, clipped to the normalised 0-255 range.
    On a CPU its two passes over the batch are compiled (torch.compile: ~4 s once a process, ~15 s where
    inductor's cache is empty); elsewhere eager ops. out: a float (B, H, W, 3) buffer to write into."""
    batch, height, width, _ = images_u8.shape
    device = images_u8.device
    maps, offsets = colour_maps(np.asarray(params, np.float64))
    scale = 1 / (255 * np.asarray(std, np.float64))
    shift = -np.asarray(mean, np.float64) / np.asarray(std, np.float64)
    pixels = next(n for n in LANE_PIXELS if height * width % n == 0)

    def lanes(values):
        return torch.as_tensor(np.tile(values, pixels), dtype=torch.float32).to(device, non_blocking=True)

    stream = _stream(images_u8)
    x = torch.empty((batch, height, width, 3), dtype=torch.float32, device=device) if out is None else out
    rows = x.view(batch, -1, 3 * pixels)
    # The channel sums in integers: a float32 sum of a large image's bytes loses units.
    exact = torch.int32 if 255 * rows.shape[1] < 2**31 else torch.int64
    sums = _compiled(channel_sums, device)(stream, rows, exact).view(batch, -1, 3).sum(1)
    grey = sums.double() @ torch.as_tensor(GREY / (height * width), device=device)
    # x_c = sum_k scale_c A_ck u_k + scale_c offset g + shift_c.
    bias = grey[:, None] * torch.as_tensor(offsets[:, None] * scale, device=device) + torch.as_tensor(shift).to(grey)
    _compiled(colour_pass, device)(stream, lanes(_taps(maps * scale[None, :, None])), bias.float().repeat(1, pixels),
                                   lanes(shift), lanes(shift + 255 * scale), rows)
    return x.permute(0, 3, 1, 2)


def _taps(weights):
    """(B, 3, 3) per-image maps W (x_c = sum_k W_ck u_k) -> (B, SHIFTS, 3) taps: output c of a pixel takes its
    byte k from STREAM_MARGIN + k - c places on in the stream; the taps that would leave the pixel are 0."""
    taps = np.zeros((len(weights), SHIFTS, 3))
    for c in range(3):
        for k in range(3):
            taps[:, k - c + STREAM_MARGIN, c] = weights[:, c, k]
    return taps


def _stream(images):
    """images' bytes as one flat tensor with STREAM_MARGIN bytes either side: a view where images lies inside a
    buffer with room for them (data's host batches), else a copy."""
    n, at = images.numel(), images.storage_offset()
    if images.is_contiguous() and at >= STREAM_MARGIN and images.untyped_storage().nbytes() >= at + n + STREAM_MARGIN:
        return images.as_strided((n + 2 * STREAM_MARGIN,), (1,), at - STREAM_MARGIN)
    stream = images.new_empty(n + 2 * STREAM_MARGIN)
    stream[:STREAM_MARGIN] = stream[n + STREAM_MARGIN:] = 0
    stream[STREAM_MARGIN:n + STREAM_MARGIN] = images.reshape(-1)
    return stream


def _compiled(function, device):
    """function compiled once per process on a CPU, where its eager ops take ~70 times longer (a pass over the
    batch for each op); on a GPU the eager ops are memory-bound and brief. Where compiling fails (no working C++
    compiler, or more kinds of shape than dynamo keeps graphs for), eager ops from then on, said once on stderr."""
    if device.type != "cpu" or _COMPILED.get(None):
        return function
    from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit
    from torch._inductor.exc import InductorError
    if function not in _COMPILED:
        _COMPILED[function] = torch.compile(function, dynamic=True, fullgraph=True)
    compiled = _COMPILED[function]

    def call(*args):
        try:
            return compiled(*args)
        # Also past dynamo's limit of graphs (8), which fullgraph=True makes an error: a process that colours
        # batches of many shapes (training has one or two).
        except (BackendCompilerFailed, FailOnRecompileLimitHit, InductorError) as error:
            _COMPILED[None] = True
            reason = str(error).strip().splitlines()[0]
            print(f"note: the colour augmentation runs uncompiled, ~70 times slower on a CPU: torch.compile "
                  f"failed ({reason})", file=sys.stderr)
            return function(*args)
    return call


def _rows(stream, shape, start=STREAM_MARGIN):
    """The batch's bytes from stream, start bytes on, as rows shaped like shape (B, G, L)."""
    batch, groups, width = shape
    return stream[start:start + batch * groups * width].view(batch, groups, width)


def channel_sums(stream, rows, dtype):
    """(B, L) sums in dtype of each image's bytes down rows (B, G, L), L / 3 pixels a row."""
    return _rows(stream, rows.shape).sum(1, dtype=dtype)


def colour_pass(stream, taps, bias, low, high, out):
    """out (B, G, L) float: a batch's normalised colours, L / 3 pixels a row, from stream (its bytes with
    STREAM_MARGIN either side) and rows of L values: an image's taps (B, SHIFTS, L) and bias (B, L), clipped to
    [low, high] (L)."""
    x = bias[:, None]
    for d in range(SHIFTS):
        x = x + _rows(stream, out.shape, d).float() * taps[:, None, d]
    return out.copy_(torch.clamp(x, low, high))


def blur_(x, sigmas):
    """Gaussian blur of the images of x (B, 3, H, W), NHWC in memory, whose sigma (B,) is positive, in place,
    with reflected edges and a kernel of radius ceil(3 sigma): an image's result depends on its own sigma alone.
    Down the columns every (column, channel) of the image is one channel of a depthwise convolution, which keeps
    the vector lanes full where the image's 3 channels would not; along the rows, its 3 channels (1.5x faster an
    image on a CPU than both passes over 3 channels, the same sums in the same order)."""
    sigmas = np.asarray(sigmas, np.float64)
    for j in np.flatnonzero(sigmas > 0).tolist():
        radius = int(np.ceil(3 * sigmas[j]))
        taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigmas[j] ** 2))
        kernel = torch.as_tensor(taps / taps.sum(), dtype=torch.float32).to(x.device, non_blocking=True)
        padded = _reflected(x[j].permute(1, 2, 0), radius)
        height, lanes = x.shape[2], padded.shape[1] * 3
        by_column = padded.view(1, -1, 1, lanes).permute(0, 3, 1, 2)
        down = F.conv2d(by_column, kernel.view(1, 1, -1, 1).expand(lanes, 1, -1, 1), groups=lanes)
        down = down.permute(0, 2, 3, 1).view(1, height, -1, 3).permute(0, 3, 1, 2)
        x[j] = F.conv2d(down, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)[0]
    return x


def _reflected(image, radius):
    """(H, W, 3) -> (H + 2 radius, W + 2 radius, 3), contiguous: image with radius pixels mirrored at each edge
    (the edge pixel itself not repeated), as F.pad's "reflect", which costs 2-4x this on an NHWC image."""
    height, width, r = image.shape[0], image.shape[1], radius
    if r >= min(height, width):
        raise ValueError(f"a reflected edge of {r} pixels needs an image larger than {height} x {width}")
    out = torch.empty((height + 2 * r, width + 2 * r, 3), dtype=image.dtype, device=image.device)
    out[r:r + height, r:r + width] = image
    out[r:r + height, :r] = out[r:r + height, r + 1:2 * r + 1].flip(1)
    out[r:r + height, r + width:] = out[r:r + height, width - 1:width + r - 1].flip(1)
    out[:r] = out[r + 1:2 * r + 1].flip(0)
    out[r + height:] = out[height - 1:height + r - 1].flip(0)
    return out
