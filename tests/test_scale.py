"""One scale from training to damage map: images at a working size, crops for training, tiles at that scale
for evaluation and prediction, and no tile grid in the damage map."""
import json

import numpy as np
import pytest
from PIL import Image

import data
from distributed import Run
import files
import preload
from conftest import module_folder, run_script
from labels import scheme_from_dict
from test_data import ARTEFACT, write_dataset


def test_working_scale_keeps_the_aspect_ratio_and_pads_small_images_to_a_crop(tmp_path):
    root = write_dataset(tmp_path / "wide", count=2, size=(200, 120))
    small = write_dataset(tmp_path / "small", count=1, size=(20, 30))
    samples = files.list_samples(root) + files.list_samples(small)
    pre = preload.preload(samples, preload.RowFormat(32, ARTEFACT, work_size=100), mode="disk")
    assert pre.shapes.tolist() == [[60, 100], [60, 100], [32, 32]]
    for row, sample in enumerate(samples[:2]):
        with Image.open(sample.image) as image:
            expected = np.asarray(image.convert("RGB").resize((100, 60), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(pre.image(row), expected)
        with Image.open(sample.mask) as mask:
            np.testing.assert_array_equal(pre.mask(row), np.asarray(mask.resize((100, 60), Image.NEAREST)))
    padded = pre.mask(2)
    assert (padded[30:] == 255).all() and (padded[:, 20:] == 255).all(), "padding is outside the object"
    assert (pre.image(2)[30:] == 0).all()


def damage_set(tmp_path, count=6, size=(120, 90)):
    """Images with one small square of damage class 5 (Hair) and a wider band of class 1, rest clean."""
    root = write_dataset(tmp_path / "ds", count=count, size=size)
    for i, sample in enumerate(files.list_samples(root)):
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[:, :20] = 1
        mask[60 + i:66 + i, 90:96] = 5
        Image.fromarray(mask).save(sample.mask)
    return root


def test_epoch_crops_are_seeded_in_bounds_and_change_each_epoch(tmp_path):
    pre = preload.preload(files.list_samples(damage_set(tmp_path)),
                          preload.RowFormat(32, ARTEFACT, work_size=120), mode="disk")
    first = data.epoch_crops(pre, 32, 42, 0, 0.5, None)
    np.testing.assert_array_equal(first, data.epoch_crops(pre, 32, 42, 0, 0.5, None))
    assert not np.array_equal(first, data.epoch_crops(pre, 32, 42, 1, 0.5, None))
    assert not np.array_equal(first, data.epoch_crops(pre, 32, 7, 0, 0.5, None))
    for (top, left), (height, width) in zip(first.tolist(), pre.shapes.tolist()):
        assert 0 <= top <= height - 32 and 0 <= left <= width - 32


def test_rare_crops_centre_on_damage_and_favour_the_rarer_class(tmp_path):
    pre = preload.preload(files.list_samples(damage_set(tmp_path)),
                          preload.RowFormat(32, ARTEFACT, work_size=120), mode="disk")
    weights = np.ones(16)
    weights[5] = 50.0
    hair = []
    for epoch in range(10):
        for row, (top, left) in enumerate(data.epoch_crops(pre, 32, 42, epoch, 1.0, weights).tolist()):
            crop = pre.mask(row)[top:top + 32, left:left + 32]
            assert (crop > 0).any(), "every crop of an image with damage shows damage"
            hair.append((crop == 5).any())
    # Hair covers 0.3 % of each image; weighted, most crops are centred on it.
    assert np.mean(hair) > 0.8


def test_rare_crops_follow_the_schemes_clean_id_not_id_0(tmp_path):
    # Id 0 is a damage class here and the clean class is 2: a crop centred on "damage" must never be one on clean.
    scheme = scheme_from_dict({"classes": [{"id": i, "name": n, "colour": c} for i, (n, c) in enumerate(
        (("crack", "#FF0000"), ("flaking", "#00FF00"), ("clean", "#000000"), ("loss", "#0000FF")))],
        "clean": 2, "ignore": 9}, "mural")
    root = write_dataset(tmp_path / "ds", count=4, size=(120, 90))
    for i, sample in enumerate(files.list_samples(root)):
        mask = np.full((90, 120), 2, np.uint8)
        mask[:, :20], mask[:, 110:] = 0, 9
        mask[60 + i:66 + i, 90:96] = 3
        Image.fromarray(mask).save(sample.mask)
    pre = preload.preload(files.list_samples(root), preload.RowFormat(32, scheme, work_size=120), mode="disk")
    crack = []
    for epoch in range(10):
        for row, (top, left) in enumerate(data.epoch_crops(pre, 32, 42, epoch, 1.0, [50.0, 1.0, 1.0, 1.0]).tolist()):
            crop = pre.mask(row)[top:top + 32, left:left + 32]
            assert np.isin(crop, (0, 1, 3)).any(), "every crop of an image with damage shows damage"
            crack.append((crop == 0).any())
    # The crack band is id 0 and weighted 50: most crops are centred on it (a uniform crop shows it 1 time in 4,
    # measured).
    assert np.mean(crack) > 0.8


def test_crops_almost_all_outside_the_object_are_drawn_again(tmp_path):
    root = write_dataset(tmp_path / "ds", count=4, size=(100, 100))
    for sample in files.list_samples(root):
        mask = np.full((100, 100), 255, np.uint8)
        mask[:30, :30] = 0
        Image.fromarray(mask).save(sample.mask)
    pre = preload.preload(files.list_samples(root), preload.RowFormat(16, ARTEFACT, work_size=100), mode="disk")
    def good(row, top, left):
        return (pre.mask(row)[top:top + 16, left:left + 16] != 255).mean() >= data.MIN_VALID

    once = np.mean([good(0, top, left) for top in range(85) for left in range(85)])
    drawn = np.mean([good(row, top, left) for epoch in range(40)
                     for row, (top, left) in enumerate(data.epoch_crops(pre, 16, 1, epoch, 0.0, None).tolist())])
    # One uniform draw is good with probability `once`; up to REDRAWS draws with 1 - (1 - once) ** REDRAWS.
    assert drawn > 2 * once and abs(drawn - (1 - (1 - once) ** data.REDRAWS)) < 0.1



def test_rows_without_ignored_pixels_get_the_crops_counting_their_pixels_gives(tmp_path):
    # Set "clean" has no ignored pixel, set "one" the same 40 x 60 rows with one ignored pixel each, so its shares
    # are counted pixel by pixel. A window wider than 155 px holds under MIN_VALID of the row and is drawn again;
    # the one pixel moves no share across MIN_VALID at any side, so both sets must draw the same crops, zoomed
    # in, inside the row, or zoomed out past its edges. (Uniform crops: the ignored pixel would move the
    # damage-centred ones' stored points.)
    sides = [np.random.default_rng(epoch).permutation([10, 30, 40, 50, 60, 61, 120, 155, 156, 200])
             for epoch in range(12)]
    crops = {}
    for name in ("clean", "one"):
        root = write_dataset(tmp_path / name, count=10, size=(60, 40))
        for k, sample in enumerate(files.list_samples(root)):
            mask = np.random.default_rng(k).choice([0, 1, 5, 15], (40, 60)).astype(np.uint8)
            if name == "one":
                mask[20, 30] = 255
            Image.fromarray(mask).save(sample.mask)
        pre = preload.preload(files.list_samples(root), preload.RowFormat(40, ARTEFACT, work_size=60), mode="disk")
        assert pre.shapes.tolist() == [[40, 60]] * 10 and (pre.counts[:, -1] == (name == "one")).all()
        crops[name] = np.stack([data.epoch_crops(pre, sides[epoch], seed, epoch, 0.0, None)
                                for seed in (1, 42) for epoch in range(12)])
    np.testing.assert_array_equal(crops["clean"], crops["one"])

def tiny_crop_run(synthetic_root, run_dir, *extra):
    args = ["train.py", "--encoder", "mit_b0", "--img-size", "64", "--work-size", "96", "--norm", "gn",
            "--batch-size", "4", "--epochs", "2", "--data", synthetic_root, "--run-dir", run_dir, "--log-every", "1000",
            "--no-report", *extra]
    done = run_script(*args)
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.fixture(scope="module")
def crop_run(request, synthetic_root, tmp_path_factory):
    with module_folder(request, tmp_path_factory, "crop") as base:
        yield tiny_crop_run(synthetic_root, base / "run")


def test_the_checkpoint_records_the_working_scale_and_full_res_scores_at_the_original_one(crop_run, synthetic_root):
    import torch
    config = torch.load(crop_run / "best.pt", weights_only=True)["config"]
    assert (config["work_size"], config["img_size"]) == (96, 64)
    scores = {}
    for extra in ((), ("--full-res",)):
        done = run_script("train.py", "--eval-only", "--checkpoint", crop_run / "best.pt", "--data", synthetic_root,
                          "--no-report", *extra)
        assert done.returncode == 0, done.stderr
        scores[extra] = json.loads(done.stdout[done.stdout.index("{"):])
    assert scores[()]["full_res"] is False and scores[("--full-res",)]["full_res"] is True
    assert (crop_run / "eval-test.json").is_file() and (crop_run / "eval-test-fullres.json").is_file()


def boundary_excess(labels, starts, tile, scale):
    """Damage share on the rows and columns where tiles meet (mapped to the original image) over the share
    everywhere: about 1 without a tile grid."""
    edges = sorted({round(s * scale) for s in starts if s} | {round((s + tile) * scale) for s in starts})
    edges = [e for e in edges if 2 <= e < labels.shape[1] - 2]
    damage = labels > 0
    near = np.zeros(labels.shape, bool)
    for e in edges:
        near[:, e - 2:e + 2] = True
        near[e - 2:e + 2, :] = True
    return damage[near].mean() / max(damage.mean(), 1e-9), damage.mean()


def test_a_photograph_four_times_the_working_size_shows_no_tile_grid(crop_run, synthetic_root, tmp_path):
    from tiles import tile_starts
    source = files.list_samples(synthetic_root)[0].image
    with Image.open(source) as image:
        big = image.convert("RGB").resize((4 * 96, 4 * 96), Image.Resampling.BICUBIC)
    (tmp_path / "in").mkdir()
    big.save(tmp_path / "in" / "big.png")
    done = run_script("predict.py", "--checkpoint", crop_run / "best.pt", tmp_path / "in", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    labels = np.asarray(Image.open(tmp_path / "out" / "big_mask.png"))
    assert labels.shape == (384, 384)
    report = json.loads((tmp_path / "out" / "big_report.json").read_text())
    assert report["settings"]["work_size"] == 96
    excess, share = boundary_excess(labels, tile_starts(96, 64, 0.25), 64, 4.0)
    assert share == 0 or excess < 1.5, f"damage is {excess:.2f}x as frequent where tiles meet"


def test_squash_mode_stays_reachable_and_predict_follows_it(synthetic_root, tmp_path):
    run_dir = tiny_crop_run(synthetic_root, tmp_path / "squash", "--work-size", "0", "--epochs", "1")
    import torch
    assert torch.load(run_dir / "best.pt", weights_only=True)["config"]["work_size"] == 0
    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 230, 3), dtype=np.uint8)).save(image)
    done = run_script("predict.py", "--checkpoint", run_dir / "best.pt", image, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert np.asarray(Image.open(tmp_path / "out" / "photo_mask.png")).shape == (150, 230)


def test_a_long_evaluation_reports_its_progress(tmp_path, capsys):
    import torch
    import evaluation
    root = write_dataset(tmp_path / "ds", count=evaluation.PROGRESS_MIN_IMAGES, size=(32, 32))
    samples = files.list_samples(root)
    part = data.Part(samples, preload.preload(samples, preload.RowFormat(32, ARTEFACT, work_size=32), mode="disk"), {})
    cfg = {"heads": "fine", "img_size": 32, "micro_batch": 4, "precision": "fp32"}
    cms = evaluation.evaluate(torch.nn.Conv2d(3, 16, 1), part, Run(cfg, torch.device("cpu")))
    assert int(cms["fine"].sum()) == sum(int((part.pre.mask(i) != 255).sum()) for i in range(len(samples)))
    assert f"evaluation: images {len(samples)}/{len(samples)}" in capsys.readouterr().err
