"""Scale and colour augmentation and the device-side data path: labels land where the geometry says, the ignore id
(255 or the scheme's) survives, colours never reach the masks, and every world size, a resumed run and
--device-data train on the same batches."""

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import config
import data
from distributed import Run
import files
import preload
from data import MEAN, STD
from conftest import ROOT, run_script, sigterm_at_step
from labels import UserError, artefact_scheme, scheme_from_dict
import test_data
from test_data import write_dataset
from test_train import final_test, tiny, train_losses

# The fixture of a private /dev/shm folder per test.
shm = test_data.shm
SIZE = 32
ARTEFACT = artefact_scheme()
# Crack / no crack with the outside of the object labelled 7: no 255 anywhere.
CRACKS = scheme_from_dict({"classes": [{"id": 0, "name": "no crack", "colour": "#000000"},
                                       {"id": 1, "name": "crack", "colour": "#FFFFFF"}],
                           "ignore": 7, "ignore_colour": "#808080"}, "the crack scheme")


def pattern_set(tmp_path, count=3, size=(96, 80)):
    """Masks of 4 x 4 blocks whose label is (block row + block column) mod 16, a 255 band in the middle rows;
    the image's red channel is 16 x the label (0 in the band), so image and mask must move together."""
    root = write_dataset(tmp_path / "pattern", count=count, size=size)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    labels = ((yy // 4 + xx // 4) % 16).astype(np.uint8)
    labels[36:44] = 255
    for i, sample in enumerate(files.list_samples(root)):
        Image.fromarray(labels).save(sample.mask)
        rgb = np.stack([np.where(labels == 255, 0, labels * 16), (xx * 2 + i) % 256, yy * 3 % 256], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(sample.image)
    return root


def crops(pre, corners, sides, flips=None):
    """The crops of rows 0, 1, ... (cycling) at corners with window sides, flipped by flips."""
    indices = np.arange(len(corners)) % len(pre)
    (images, masks), = data.batches(pre, indices, len(corners), data.Crops(np.array(corners), flips, np.array(sides)))
    return images.numpy(), masks.numpy()


def test_a_zoomed_crop_puts_every_label_where_the_geometry_says(tmp_path, shm):
    with preload.preload(files.list_samples(pattern_set(tmp_path)),
                         preload.RowFormat(SIZE, ARTEFACT, work_size=96)) as pre:
        labels, red = pre.mask(0), pre.image(0)[..., 0]
        # Zoom in by 2 (a 16 px window): each source pixel covers 2 x 2 output pixels.
        images, masks = crops(pre, [(30, 40)], [16])
        np.testing.assert_array_equal(masks[0], labels[30:46, 40:56].repeat(2, 0).repeat(2, 1))
        # Where the source pixel and its 8 neighbours share one label, the bilinear image has that block's
        # colour: red is still 16 x the label, so the image moved with the mask.
        source = 30 + np.arange(32) // 2, 40 + np.arange(32) // 2
        uniform = np.array([[np.ptp(labels[y - 1:y + 2, x - 1:x + 2]) == 0 for x in source[1]] for y in source[0]])
        inner = uniform & (masks[0] != 255)
        assert inner.mean() > 0.1 and (masks[0] == 255).any()
        np.testing.assert_array_equal(images[0][..., 0][inner], masks[0][inner].astype(int) * 16)
        # Zoom out by 2 (a 64 px window): the odd pixels' labels; the image shrunk as Pillow does it.
        images, masks = crops(pre, [(8, 20)], [64])
        np.testing.assert_array_equal(masks[0], labels[8:72, 20:84][1::2, 1::2])
        assert_like_pillow(images[0], pre.image(0)[8:72, 20:84])
        assert (masks[0] == 255).any() and red[36:44].max() == 0


def assert_like_pillow(image, window):
    """Pillow's BILINEAR resize (a filter as wide as the scale when shrinking): torch's fixed-point kernel rounds
    a few pixels the other way."""
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(window)).resize(image.shape[:2][::-1], Image.BILINEAR))
    difference = np.abs(image.astype(int) - expected)
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_any_scale_resizes_the_image_as_pillow_does(tmp_path, shm):
    with preload.preload(files.list_samples(pattern_set(tmp_path)),
                         preload.RowFormat(SIZE, ARTEFACT, work_size=96)) as pre:
        sides = [11, 23, 32, 45, 77]
        images, _ = crops(pre, [(3, 5)] * len(sides), sides)
        for j, (image, side) in enumerate(zip(images, sides)):
            assert_like_pillow(image, pre.image(j % len(pre))[3:3 + side, 5:5 + side])


@pytest.mark.parametrize("side, size", [(245, 96), (97, 64), (64, 97), (33, 33), (7, 50)])
def test_the_resize_into_the_batch_is_torchs_antialiased_bilinear_bit_for_bit(side, size):
    """resize_pixels writes through the uint8 kernel's out= form (2-3x faster than planes and a copy): the bytes
    F.interpolate gives, from a strided window of a larger row and into a slot of a batch."""
    import torch.nn.functional as F
    rng = np.random.default_rng(side)
    row = torch.from_numpy(rng.integers(0, 256, (side + 9, side + 20, 3), dtype=np.uint8))
    window = row[5:5 + side, 11:11 + side]
    batch = torch.zeros((3, size, size, 3), dtype=torch.uint8)
    assert augment.resize_pixels(window, size, batch[1]).data_ptr() == batch[1].data_ptr()
    expected = F.interpolate(window.permute(2, 0, 1)[None].contiguous(), size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0].permute(1, 2, 0)
    assert torch.equal(batch[1], expected) and not batch[0].any() and not batch[2].any()
    assert torch.equal(augment.resize_pixels(window, size), expected)


def test_a_window_larger_than_the_image_is_padded_with_255_outside_it(tmp_path, shm):
    with preload.preload(files.list_samples(pattern_set(tmp_path, size=(40, 36))),
                         preload.RowFormat(SIZE, ARTEFACT, work_size=40)) as pre:
        assert pre.shapes[0].tolist() == [36, 40]
        # A 64 px window (scale 0.5) with the image at offset (10, 12): output pixel i shows source 2 i + 1.
        images, masks = crops(pre, [(-10, -12)], [64])
        source = np.arange(1, 64, 2)
        ys, xs = source - 10, source - 12
        inside = ((ys >= 0) & (ys < 36))[:, None] & ((xs >= 0) & (xs < 40))[None, :]
        assert (masks[0][~inside] == 255).all() and inside.mean() > 0.3
        expected = pre.mask(0)[np.clip(ys, 0, 35)][:, np.clip(xs, 0, 39)]
        np.testing.assert_array_equal(masks[0][inside], expected[inside])
        # The image is the resize of the window padded with black.
        assert_like_pillow(images[0], np.pad(pre.image(0), ((10, 18), (12, 12), (0, 0))))


def test_off_the_image_the_mask_holds_the_schemes_ignore_id_on_the_host_and_the_device(tmp_path, shm):
    root = write_dataset(tmp_path / "ds", count=2, size=(40, 36))
    cracks = (np.arange(36)[:, None] + np.arange(40)[None]) % 3 == 0
    for sample in files.list_samples(root):
        mask = np.where(cracks, 1, 0).astype(np.uint8)
        mask[:, 30:] = CRACKS.ignore
        Image.fromarray(mask).save(sample.mask)
    with preload.preload(files.list_samples(root), preload.RowFormat(SIZE, CRACKS, work_size=40)) as pre:
        # A 64 px window (scale 0.5) at (-10, -12): output pixel i shows source 2 i + 1 - offset.
        corners, sides = np.array([(-10, -12), (-10, -12)]), np.array([64, 64])
        images, masks = crops(pre, corners, sides)
        source = np.arange(1, 64, 2)
        ys, xs = source - 10, source - 12
        inside = ((ys >= 0) & (ys < 36))[:, None] & ((xs >= 0) & (xs < 40))[None, :]
        expected = np.where(inside, pre.mask(0)[np.clip(ys, 0, 35)][:, np.clip(xs, 0, 39)], CRACKS.ignore)
        np.testing.assert_array_equal(masks[0], expected)
        assert set(np.unique(masks).tolist()) == {0, 1, 7}
        rows = data.rows_on_device(pre, "cpu")
        on_device = augment.device_crops(rows, np.arange(2), corners, sides, SIZE)
        np.testing.assert_array_equal(on_device[1].numpy(), masks)
        np.testing.assert_array_equal(on_device[0].numpy(), images)


def test_flips_of_a_scaled_crop_move_image_and_mask_together(tmp_path, shm):
    with preload.preload(files.list_samples(pattern_set(tmp_path)),
                         preload.RowFormat(SIZE, ARTEFACT, work_size=96)) as pre:
        plain_images, plain_masks = crops(pre, [(30, 40)] * 3, [16] * 3)
        flips = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 1]], bool)
        images, masks = crops(pre, [(30, 40)] * 3, [16] * 3, flips)
        for b, (hflip, vflip, rot) in enumerate(flips.tolist()):
            expected_image, expected_mask = plain_images[b], plain_masks[b]
            if hflip:
                expected_image, expected_mask = expected_image[:, ::-1], expected_mask[:, ::-1]
            if vflip:
                expected_image, expected_mask = expected_image[::-1], expected_mask[::-1]
            if rot:
                expected_image, expected_mask = np.rot90(expected_image), np.rot90(expected_mask)
            np.testing.assert_array_equal(images[b], expected_image)
            np.testing.assert_array_equal(masks[b], expected_mask)


def crop_cfg(**changes):
    cfg = dict(seed=5, img_size=SIZE, rare_crops=0.5, scale_aug=[0.5, 2.0], colour_aug=0.4, blur_aug=0.5,
               batch_size=4, per_rank_batch=4, micro_batch=2, accum_steps=2, channels_last=True)
    return dict(cfg, **changes)


def epoch(pre, cfg, rank=0, world=1, step0=0, rows=None):
    run = Run(cfg, torch.device("cpu"), rank, world)
    return [(x.clone(), y.clone()) for x, y in data.train_batches(pre, run, 1, step0, rows=rows)]


def test_augmented_batches_are_the_same_for_one_and_two_ranks_after_a_resume_and_on_the_device(tmp_path, shm):
    root = write_dataset(tmp_path / "ds", count=9, size=(90, 50))
    with preload.preload(files.list_samples(root), preload.RowFormat(SIZE, ARTEFACT, work_size=90)) as pre:
        cfg = crop_cfg()
        one = epoch(pre, cfg)
        assert len(one) == 2 * 2, "2 steps of 2 micro-batches"
        by_row = torch.cat([x for x, _ in one]), torch.cat([y for _, y in one])
        # Two ranks: rank r gets the global batch's rows r, r + 2, ... (data.train_batches splits order[r::2]).
        two = [epoch(pre, crop_cfg(per_rank_batch=2, micro_batch=1), rank, 2) for rank in (0, 1)]
        for rank, batches in enumerate(two):
            for step in range(2):
                for k in range(2):
                    row = step * 4 + rank + 2 * k
                    x, y = batches[step * 2 + k]
                    assert torch.equal(x[0], by_row[0][row]) and torch.equal(y[0], by_row[1][row])
        resumed = epoch(pre, cfg, step0=1)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, one[2:]))
        on_device = epoch(pre, cfg, rows=data.rows_on_device(pre, "cpu"))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(on_device, one))
        # The augmentation is really on: the same rows without it differ, and only by the images.
        plain = epoch(pre, crop_cfg(scale_aug=None, colour_aug=0.0, blur_aug=0.0))
        assert not torch.equal(plain[0][0], one[0][0])
        geometry = epoch(pre, crop_cfg(colour_aug=0.0, blur_aug=0.0))
        assert all(torch.equal(a[1], b[1]) for a, b in zip(geometry, one)), "colours never change the masks"


def test_without_augmentation_the_batches_are_the_plain_crops(tmp_path, shm):
    root = write_dataset(tmp_path / "ds", count=5, size=(70, 50))
    with preload.preload(files.list_samples(root), preload.RowFormat(SIZE, ARTEFACT, work_size=70)) as pre:
        cfg = crop_cfg(scale_aug=None, colour_aug=0.0, blur_aug=0.0, seed=3)
        plan = data.epoch_plan(pre, cfg, 1)
        assert (plan.sides == SIZE).all() and plan.photometric is None
        np.testing.assert_array_equal(plan.corners, data.epoch_crops(pre, SIZE, 3, 1, 0.5, None))
        rows = plan.order[:4]
        (images, masks), = data.batches(pre, rows, 4, data.Crops(plan.corners[rows], plan.flips[rows]))
        x, y = torch.cat([x for x, _ in epoch(pre, cfg)]), torch.cat([y for _, y in epoch(pre, cfg)])
        expected_x, expected_y = data.to_device_batch(images, masks, "cpu")
        assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
        on_device = epoch(pre, cfg, rows=data.rows_on_device(pre, "cpu"))
        assert torch.equal(torch.cat([x for x, _ in on_device]), x)


def torchvision_colour(image, b, c, s):
    """torchvision's brightness, contrast, saturation in that order on a float image in [0, 1] (3, H, W)."""
    from torchvision.transforms.v2 import functional as TF
    return TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)


def denormalize(x):
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_brightness_contrast_and_saturation_equal_torchvisions_and_leave_masks_alone():
    rng = np.random.default_rng(0)
    # Mid-range colours and mild factors: no channel leaves 0-255, where torchvision clips after every step.
    images = torch.from_numpy(rng.integers(90, 166, (4, 12, 10, 3), dtype=np.uint8))
    masks = torch.from_numpy(rng.choice([0, 3, 255], (4, 12, 10)).astype(np.uint8))
    params = np.array([[1.1, 0.9, 1.2, 0, 0], [0.9, 1.15, 0.8, 0, 0], [1, 1, 0, 0, 0], [1.05, 0.8, 1.1, 0, 0]])
    x, y = data.to_device_batch(images, masks, "cpu", photometric=params)
    assert torch.equal(y, masks.long())
    got = denormalize(x)
    for b in range(4):
        expected = torchvision_colour(images[b].permute(2, 0, 1).float() / 255, *params[b, :3])
        # torchvision's grey is 0.2989 R + 0.587 G + 0.114 B; ours is ITU-R 601's 0.299.
        torch.testing.assert_close(got[b], expected, atol=2e-4, rtol=0)
    grey = got[2].permute(1, 2, 0)
    assert (grey.max(-1).values - grey.min(-1).values).max() < 1e-5, "saturation 0 is grey"


def test_hue_rotates_the_chroma_plane_and_keeps_the_luma():
    rng = np.random.default_rng(1)
    # Mid-range colours: no channel leaves 0-255, where the result is clipped.
    images = torch.from_numpy(rng.integers(90, 166, (3, 8, 8, 3), dtype=np.uint8))
    shifts = np.array([0.1, -0.05, 0.2])
    params = np.column_stack([np.ones((3, 3)), shifts, np.zeros(3)])
    x, _ = data.to_device_batch(images, torch.zeros(3, 8, 8, dtype=torch.uint8), "cpu", photometric=params)
    yiq = torch.tensor(augment.YIQ, dtype=torch.float64)
    before = images.double() / 255 @ yiq.T
    after = denormalize(x).permute(0, 2, 3, 1).double() @ yiq.T
    torch.testing.assert_close(after[..., 0], before[..., 0], atol=1e-5, rtol=0)
    angle = torch.atan2(after[..., 2], after[..., 1]) - torch.atan2(before[..., 2], before[..., 1])
    turned = torch.remainder(angle / (2 * np.pi) - torch.tensor(shifts).view(3, 1, 1) + 0.5, 1) - 0.5
    assert turned.abs().max() < 1e-4
    torch.testing.assert_close(after[..., 1:].norm(dim=-1), before[..., 1:].norm(dim=-1), atol=1e-5, rtol=0)


def test_values_beyond_the_range_are_clipped_to_it():
    images = torch.full((1, 4, 4, 3), 200, dtype=torch.uint8)
    x, _ = data.to_device_batch(images, torch.zeros(1, 4, 4, dtype=torch.uint8), "cpu",
                                photometric=np.array([[1.4, 1, 1, 0, 0]]))
    torch.testing.assert_close(denormalize(x), torch.ones(1, 3, 4, 4), atol=1e-6, rtol=0)


def colour_oracle(images, params):
    """float64 numpy: each image's colour map A u + k g (g its mean grey), normalised, clipped to the normalised
    0-255 range; (B, H, W, 3)."""
    maps, offsets = augment.colour_maps(params)
    u = images.numpy().astype(np.float64)
    grey = (u @ augment.GREY).mean((1, 2))
    coloured = np.einsum("bck,bhwk->bhwc", maps, u) + (offsets * grey)[:, None, None, None]
    return (np.clip(coloured, 0, 255) / 255 - np.array(MEAN)) / np.array(STD)


@pytest.mark.parametrize("batch, height, width", [(3, 1, 1), (2, 1, 97), (1, 61, 1), (3, 13, 17), (2, 32, 32),
                                                  (1, 7, 384), (2, 48, 40)])
def test_the_colour_map_is_each_images_affine_map_on_any_shape(batch, height, width):
    rng = np.random.default_rng(height * 1000 + width)
    images = torch.from_numpy(rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8))
    params = augment.photometric_params(batch, 0.4, 0.0, height, width)
    params[0, :4] = (1.4, 0.6, 1.4, 0.1)  # the range's corner, clipped here and there
    expected = colour_oracle(images, params)
    got = augment.colour_normalize(images, params, MEAN, STD).permute(0, 2, 3, 1).double().numpy()
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


def test_a_batch_is_read_in_place_from_its_host_buffer_and_its_neighbours_bytes_do_not_matter(monkeypatch):
    rng = np.random.default_rng(7)
    buffer = torch.from_numpy(rng.integers(0, 256, 5 * 24 * 24 * 3, dtype=np.uint8))
    images = buffer[24 * 24 * 3:4 * 24 * 24 * 3].view(3, 24, 24, 3)  # images 1-3 of 5, random ones either side
    params = augment.photometric_params(3, 0.4, 0.0, 42, 1)
    assert augment._stream(images).data_ptr() == images.data_ptr() - augment.STREAM_MARGIN
    in_place = augment.colour_normalize(images, params, MEAN, STD)
    alone = augment.colour_normalize(images.clone(), params, MEAN, STD)
    assert torch.equal(in_place, alone)
    host, _ = data._batch_buffers(24, False, None)(0, 3)
    assert augment._stream(host).data_ptr() == host.data_ptr() - augment.STREAM_MARGIN, "the loader's batches too"
    monkeypatch.setitem(augment._COMPILED, None, True)  # the eager ops, as on a GPU
    torch.testing.assert_close(augment.colour_normalize(images, params, MEAN, STD), alone, atol=1e-6, rtol=0)


def test_without_a_working_compiler_the_colour_map_runs_eager_and_says_so_once(tmp_path):
    script = ("import numpy as np, torch, augment\n"
              "from data import MEAN, STD\n"
              "images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 9, 11, 3), dtype=np.uint8))\n"
              "params = augment.photometric_params(2, 0.4, 0.0, 42, 1)\n"
              "x = [augment.colour_normalize(images, params, MEAN, STD) for _ in range(2)]\n"
              "augment._COMPILED[None] = True\n"
              "print(float((x[1] - augment.colour_normalize(images, params, MEAN, STD)).abs().max()))\n")
    result = run_script("-c", script, env={"CXX": str(tmp_path / "no-such-g++"),
                                          "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "runs uncompiled" in notes[0] and "no-such-g++" in notes[0], result.stderr
    assert float(result.stdout) == 0.0


@pytest.mark.parametrize("height, width, sigma", [(20, 24, 1.3), (13, 97, 2.0), (71, 7, 0.9)])
def test_blur_is_torchvisions_gaussian_blur_of_the_drawn_sigma_and_spares_the_others(height, width, sigma):
    from torchvision.transforms.v2 import functional as TF
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8))
    masks = torch.from_numpy(rng.integers(0, 16, (3, height, width), dtype=np.uint8))
    params = np.array([[1, 1, 1, 0, sigma], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0.4]])
    x, y = data.to_device_batch(images, masks, "cpu", photometric=params)
    plain, _ = data.to_device_batch(images, masks, "cpu")
    assert torch.equal(y, masks.long()) and torch.equal(x[1], plain[1])
    assert x.is_contiguous(memory_format=torch.channels_last)
    for b in (0, 2):
        side = 2 * int(np.ceil(3 * params[b, 4])) + 1
        expected = TF.gaussian_blur(plain[b:b + 1].contiguous(), [side, side], [params[b, 4]] * 2)
        torch.testing.assert_close(x[b:b + 1], expected, atol=1e-5, rtol=0)


def test_the_draws_are_seeded_within_their_ranges():
    sides = augment.crop_sides(2000, 384, (0.5, 2.0), 42, 3)
    assert sides.min() >= 192 and sides.max() <= 768
    np.testing.assert_array_equal(sides, augment.crop_sides(2000, 384, (0.5, 2.0), 42, 3))
    assert not np.array_equal(sides, augment.crop_sides(2000, 384, (0.5, 2.0), 42, 4))
    assert abs(np.mean(sides > 384) - 0.5) < 0.05, "log-uniform: zoomed in as often as out"
    params = augment.photometric_params(2000, 0.4, 0.25, 42, 3)
    assert params[:, :3].min() >= 0.6 and params[:, :3].max() <= 1.4 and np.abs(params[:, 3]).max() <= 0.1
    blurred = params[:, 4] > 0
    assert abs(blurred.mean() - 0.25) < 0.05 and params[blurred, 4].min() >= 0.1 and params[:, 4].max() <= 2.0
    assert augment.photometric_params(10, 0.0, 0.0, 42, 3) is None


def test_rare_crops_centre_scaled_windows_on_damage(tmp_path):
    from test_scale import damage_set
    pre = preload.preload(files.list_samples(damage_set(tmp_path)),
                          preload.RowFormat(32, ARTEFACT, work_size=120), mode="disk")
    weights = np.ones(16)
    weights[5] = 50.0
    hair = []
    for epoch_ in range(10):
        sides = augment.crop_sides(len(pre), 32, (0.5, 2.0), 42, epoch_)
        for row, ((top, left), side) in enumerate(zip(data.epoch_crops(pre, sides, 42, epoch_, 1.0, weights).tolist(),
                                                      sides.tolist())):
            window = augment.window(pre.mask(row), top, left, side, 255)
            assert (window > 0).any() and (window != 255).any()
            hair.append((window == 5).any())
    assert np.mean(hair) > 0.8


@pytest.mark.parametrize("scheme", [ARTEFACT, CRACKS], ids=["ignore 255", "ignore 7"])
def test_scaled_windows_almost_all_outside_the_object_are_drawn_again(tmp_path, scheme):
    root = write_dataset(tmp_path / "ds", count=4, size=(100, 100))
    for sample in files.list_samples(root):
        mask = np.full((100, 100), scheme.ignore, np.uint8)
        mask[:30, :30] = 0
        Image.fromarray(mask).save(sample.mask)
    pre = preload.preload(files.list_samples(root), preload.RowFormat(16, scheme, work_size=100), mode="disk")
    side = 24

    def good(top, left):
        return (augment.window(pre.mask(0), top, left, side, scheme.ignore) != scheme.ignore).mean() >= data.MIN_VALID

    once = np.mean([good(top, left) for top in range(100 - side + 1) for left in range(100 - side + 1)])
    drawn = np.mean([good(top, left) for epoch_ in range(40)
                     for top, left in data.epoch_crops(pre, np.full(4, side), 1, epoch_, 0.0, None).tolist()])
    assert drawn > 2 * once and abs(drawn - (1 - (1 - once) ** data.REDRAWS)) < 0.1


@pytest.mark.parametrize("flags, message", [
    (["--scale-aug", "0.2,2"], "--scale-aug 0.2,2: give LO,HI with 0.25 <= LO <= HI <= 4"),
    (["--scale-aug", "2,1"], "--scale-aug 2,1: give LO,HI"),
    (["--scale-aug", "fast"], "--scale-aug fast: give LO,HI"),
    (["--colour-aug", "1.5"], "--colour-aug 1.5: must be between 0 and 1"),
    (["--blur-aug", "-0.1"], "--blur-aug -0.1: must be between 0 and 1")])
def test_augmentation_flags_out_of_range_are_refused_naming_the_flag(flags, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        config.resolve_config(config.parse_args(["--img-size", "64", *flags]), 1, torch.device("cpu"))
    cfg = config.resolve_config(config.parse_args(["--img-size", "64", "--scale-aug", "0.5,2"]), 1,
                                torch.device("cpu"))
    assert cfg["scale_aug"] == [0.5, 2.0] and cfg["colour_aug"] == 0 and not cfg["device_data"]


def test_device_data_needs_the_preloaded_rows(tmp_path):
    root = write_dataset(tmp_path / "ds", count=2)
    with pytest.raises(UserError, match="--device-data: needs the training images preloaded"):
        data.rows_on_device(preload.preload(files.list_samples(root),
                                            preload.RowFormat(16, ARTEFACT), mode="disk"), "cpu")


def test_an_augmented_run_stopped_mid_epoch_resumes_on_device_data_to_the_uninterrupted_result(synthetic_root,
                                                                                                tmp_path):
    flags = ("--scale-aug", "0.5,2", "--colour-aug", "0.4", "--blur-aug", "0.3", "--batch-size", "2", "--epochs", "1")
    straight = run_script(*tiny(synthetic_root, tmp_path / "straight", *flags))
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "preempted"
    stopped = sigterm_at_step(tiny(synthetic_root, run_dir, *flags, "--log-every", "1"))
    assert stopped.returncode == 0 and "SIGTERM: saved" in stopped.stdout, stopped.stderr
    # --device-data may change on resume: on a CPU it cuts the same crops as the host.
    resumed = run_script(*tiny(synthetic_root, run_dir, *flags, "--device-data", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert final_test(run_dir)["test"] == final_test(tmp_path / "straight")["test"]
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-6)
