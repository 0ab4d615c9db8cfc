"""data.py: folder datasets, leak-free splits, the node-shared preload and its lifetime, batches, parquet ingestion."""
import csv
import hashlib
import io
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import files
import prepare
import preload
import splits
from splits import Protocol
from data import MEAN, STD
from labels import UserError, artefact_scheme

REPO = Path(__file__).resolve().parents[1]
ARTEFACT = artefact_scheme()
PALETTE = list(ARTEFACT.colours)


def write_dataset(root, count=6, size=(40, 32), materials=("Paper", "Canvas", "Glass"),
                  contents=("Line art", "Artistic depiction"), seed=0):
    """count random image/mask pairs of size (W, H) with a metadata.csv cycling through materials/contents."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rows = []
    for i in range(count):
        sample_id = f"img{i:02d}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "images" / f"{sample_id}.png")
        mask = rng.choice([0, 1, 5, 15, 255], (size[1], size[0])).astype(np.uint8)
        Image.fromarray(mask).save(root / "annotations" / f"{sample_id}.png")
        rows.append((sample_id, materials[i % len(materials)], contents[i % len(contents)]))
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "material", "content"), *rows])
    return root


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "ds")


@pytest.fixture
def shm(monkeypatch):
    """A private directory on /dev/shm for preload files, inherited by subprocesses through the environment."""
    directory = Path("/dev/shm") / f"pytest-artdamage-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    monkeypatch.setenv("ARTDAMAGE_SHM_DIR", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def leftovers(directory):
    """Preload files still present (the zero-byte lock file is meant to stay)."""
    return sorted(p.name for p in directory.iterdir() if p.name != "artdamage.lock")


def python(code, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def wait_for(condition, process):
    """Polls condition while process runs (a handshake, not a timing assertion)."""
    while not condition():
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image)


def mode(path):
    with Image.open(path) as image:
        return image.mode


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def resized(path, size, resample):
    """Independent reference: plain Pillow resize of the file (bilinear for images, nearest for masks)."""
    with Image.open(path) as image:
        return np.asarray(image.resize((size, size), resample))



def test_list_samples_pairs_images_and_masks_by_id_and_ignores_other_files(dataset):
    (dataset / "images" / "notes.txt").write_text("not data")
    samples = files.list_samples(dataset)
    assert [s.id for s in samples] == [f"img{i:02d}" for i in range(6)]
    assert all(s.image.parent.name == "images" and s.mask.parent.name == "annotations" for s in samples)
    assert all(s.image.stem == s.mask.stem == s.id for s in samples)


def test_read_image_and_id_mask(dataset):
    sample = files.list_samples(dataset)[0]
    image, mask = files.read_image(sample.image), files.read_mask(sample.mask, ARTEFACT, (32, 40))
    assert image.shape == (32, 40, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, pixels(sample.image))
    np.testing.assert_array_equal(mask, pixels(sample.mask))


def test_rgb_mask_in_artefact_colours_becomes_ids_and_background_255(tmp_path):
    ids = np.array([[0, 1, 2, 255], [15, 14, 9, 3]], dtype=np.uint8)
    colours = {i: PALETTE[i] for i in range(16)} | {255: (0x5A, 0x00, 0x07)}
    rgb = np.array([[colours[v] for v in row] for row in ids.tolist()], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full(ids.shape, 255, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(files.read_mask(tmp_path / "rgb.png", ARTEFACT), ids)
    np.testing.assert_array_equal(files.read_mask(tmp_path / "rgba.png", ARTEFACT), ids)


def test_grey_rgb_mask_is_read_as_ids(tmp_path):
    ids = np.array([[0, 3, 255], [15, 1, 2]], dtype=np.uint8)
    Image.fromarray(np.dstack([ids] * 3)).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(files.read_mask(tmp_path / "grey.png", ARTEFACT), ids)


def test_palette_mask_is_read_as_its_indices_not_its_colours(tmp_path):
    ids = np.array([[0, 1, 2], [7, 255, 15]], dtype=np.uint8)
    image = Image.fromarray(ids, mode="L").convert("P")
    image.putpalette([200, 10, 10] * 256)
    image.save(tmp_path / "p.png")
    assert mode(tmp_path / "p.png") == "P"
    np.testing.assert_array_equal(files.read_mask(tmp_path / "p.png", ARTEFACT), ids)


def test_16_bit_mask_with_valid_ids_is_accepted(tmp_path):
    ids = np.array([[0, 1, 15], [255, 4, 0]], dtype=np.uint16)
    Image.fromarray(ids).save(tmp_path / "wide.png")
    assert mode(tmp_path / "wide.png").startswith("I")
    np.testing.assert_array_equal(files.read_mask(tmp_path / "wide.png", ARTEFACT), ids.astype(np.uint8))


def test_check_cli_summarises_a_valid_dataset(dataset, capsys):
    assert prepare.main(["check", str(dataset)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: 6 image/mask pairs in {dataset}")


def test_resolve_data_names_the_synthetic_folder_by_count_and_size_and_rejects_missing_folders(tmp_path, monkeypatch):
    calls = []

    def fake_make_synthetic(root, count, size, seed):
        calls.append((Path(root).name, count, size, seed))
        return root

    monkeypatch.setattr(data, "SYNTHETIC_DIR", tmp_path)
    monkeypatch.setattr(data, "make_synthetic", fake_make_synthetic)
    assert data.resolve_data("synthetic", 8, 64) == tmp_path / "synthetic-8-64"
    assert calls == [("synthetic-8-64", 8, 64, 42)]
    with pytest.raises(UserError, match="--data"):
        data.resolve_data(str(tmp_path / "nowhere"))



def test_preload_equals_a_direct_resize_of_each_file(dataset, shm):
    samples = files.list_samples(dataset)
    with preload.preload(samples, preload.RowFormat(16, ARTEFACT)) as pre:
        assert pre.shapes.tolist() == [[16, 16]] * 6
        assert pre.ids == [s.id for s in samples]
        for i, sample in enumerate(samples):
            np.testing.assert_array_equal(pre.image(i), resized(sample.image, 16, Image.BILINEAR))
            np.testing.assert_array_equal(pre.mask(i), resized(sample.mask, 16, Image.NEAREST))
            counts = np.bincount(pre.mask(i).ravel(), minlength=256)
            assert pre.counts[i].tolist() == counts[:16].tolist() + [counts[255]]
        assert Path(pre.path).parent == shm


def test_disk_mode_gives_the_same_rows_as_shared_memory(dataset, shm):
    samples = files.list_samples(dataset)
    with preload.preload(samples, preload.RowFormat(16, ARTEFACT, offline_aug=True)) as pre, \
            preload.preload(samples, preload.RowFormat(16, ARTEFACT, offline_aug=True), mode="disk") as disk:
        assert disk.ids == pre.ids
        np.testing.assert_array_equal(disk.counts, pre.counts)
        np.testing.assert_array_equal(disk.points, pre.points)
        for i in (0, 5, 10, 23):
            np.testing.assert_array_equal(disk.image(i), pre.image(i))
            np.testing.assert_array_equal(disk.mask(i), pre.mask(i))


def test_offline_augmentation_adds_three_copies_of_training_images_only(dataset, shm):
    train_ids, _, val_ids = splits.split_ids(dataset, Protocol("kfold", 3))
    by_id = {s.id: s for s in files.list_samples(dataset)}
    with preload.preload([by_id[i] for i in train_ids], preload.RowFormat(16, ARTEFACT, offline_aug=True)) as train, \
            preload.preload([by_id[i] for i in val_ids], preload.RowFormat(16, ARTEFACT)) as val:
        assert len(train) == 4 * len(train_ids) and len(val) == len(val_ids)
        assert set(train.ids) == set(train_ids) and set(train.ids).isdisjoint(val.ids)
        for k, sample_id in enumerate(train_ids):
            image = resized(by_id[sample_id].image, 16, Image.BILINEAR)
            mask = resized(by_id[sample_id].mask, 16, Image.NEAREST)
            expected = [(image, mask), (image[:, ::-1], mask[:, ::-1]), (image[::-1], mask[::-1]),
                        (np.rot90(image), np.rot90(mask))]
            for j, (img, msk) in enumerate(expected):
                assert train.ids[4 * k + j] == sample_id
                np.testing.assert_array_equal(train.image(4 * k + j), img)
                np.testing.assert_array_equal(train.mask(4 * k + j), msk)


def test_second_process_maps_the_same_bytes_without_building(dataset, shm):
    samples = files.list_samples(dataset)
    with preload.preload(samples, preload.RowFormat(16, ARTEFACT)) as pre:
        child = python(f"""
import labels, hashlib, files, preload
pre = preload.preload(files.list_samples({str(dataset)!r}),
                      preload.RowFormat(16, labels.artefact_scheme()), node=(1, 2), timeout=20)
print(pre.path, hashlib.sha256(pre.buffer.tobytes()).hexdigest())
""")
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        path, digest = out.split()
        assert path == str(pre.path)
        assert digest == hashlib.sha256(pre.buffer.tobytes()).hexdigest()
        assert leftovers(shm) != []
    assert leftovers(shm) == []


def test_waiting_rank_gets_the_builders_error(tmp_path, shm):
    root = write_dataset(tmp_path / "ds", count=2)
    Image.fromarray(np.full((32, 40), 40, np.uint8)).save(root / "annotations" / "img01.png")
    waiter = python(f"""
import files, labels, preload, sys
try:
    preload.preload(files.list_samples({str(root)!r}),
                    preload.RowFormat(16, labels.artefact_scheme()), node=(1, 2), timeout=30)
except labels.UserError as exc:
    print(exc)
""")
    wait_for(lambda: any(shm.glob("artdamage-*.users/*")), waiter)
    with pytest.raises(UserError, match="img01.png.*40") as raised:
        preload.preload(files.list_samples(root), preload.RowFormat(16, ARTEFACT))
    out, err = waiter.communicate(timeout=60)
    assert out.strip() == str(raised.value), err
    assert leftovers(shm) == []


def test_segment_is_removed_after_the_last_user_closes(dataset, shm):
    samples = files.list_samples(dataset)
    form = preload.RowFormat(16, ARTEFACT)
    first, second = preload.preload(samples, form), preload.preload(samples, form)
    assert first.path == second.path
    first.close()
    first.close()
    assert Path(second.path).exists()
    assert second.mask(0).sum() >= 0
    second.close()
    assert leftovers(shm) == []


def test_segment_is_removed_when_the_owning_process_dies_of_an_exception(dataset, shm):
    child = python(f"""
import labels, files, preload
pre = preload.preload(files.list_samples({str(dataset)!r}), preload.RowFormat(16, labels.artefact_scheme()))
raise RuntimeError("training crashed")
""")
    out, err = child.communicate(timeout=60)
    assert child.returncode == 1 and "training crashed" in err
    assert leftovers(shm) == []


def test_segment_of_a_sigkilled_run_is_reclaimed_by_the_next_run(tmp_path, dataset, shm):
    child = python(f"""
import labels, files, preload, time
pre = preload.preload(files.list_samples({str(dataset)!r}), preload.RowFormat(16, labels.artefact_scheme()))
print("ready", flush=True)
time.sleep(600)
""")
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert any(name.endswith(".u8") for name in leftovers(shm))
    other = write_dataset(tmp_path / "other", count=2)
    with preload.preload(files.list_samples(other), preload.RowFormat(16, ARTEFACT)) as pre:
        assert leftovers(shm) == sorted([Path(pre.path).name, Path(pre.path).name[:-3] + ".users"])
    assert leftovers(shm) == []


def test_a_build_killed_half_way_is_taken_over_by_the_next_run(dataset, shm):
    child = python(f"""
import labels, files, preload, time
def stall(*args):
    print("building", flush=True)
    time.sleep(600)
preload._fill = stall
preload.preload(files.list_samples({str(dataset)!r}), preload.RowFormat(16, labels.artefact_scheme()))
""")
    assert child.stdout.readline().strip() == "building"
    assert any(name.endswith(".tmp") for name in leftovers(shm))
    child.send_signal(signal.SIGKILL)
    child.communicate()
    samples = files.list_samples(dataset)
    with preload.preload(samples, preload.RowFormat(16, ARTEFACT)) as pre:
        np.testing.assert_array_equal(pre.mask(2), resized(samples[2].mask, 16, Image.NEAREST))
        assert not any(name.endswith(".tmp") for name in leftovers(shm))
    assert leftovers(shm) == []


def test_live_segment_of_another_run_is_never_touched(tmp_path, dataset, shm):
    child = python(f"""
import labels, files, preload, sys
pre = preload.preload(files.list_samples({str(dataset)!r}), preload.RowFormat(16, labels.artefact_scheme()))
print(pre.path, int(pre.buffer.sum()), flush=True)
sys.stdin.readline()
print(int(pre.buffer.sum()), flush=True)
pre.close()
""", stdin=subprocess.PIPE)
    path, total = child.stdout.readline().split()
    other = write_dataset(tmp_path / "other", count=2)
    with preload.preload(files.list_samples(other), preload.RowFormat(16, ARTEFACT)):
        pass
    assert Path(path).exists()
    out, err = child.communicate("go\n", timeout=60)
    assert out.strip() == total, err
    assert leftovers(shm) == []



def test_batches_yield_the_requested_rows_in_order_and_stay_valid(dataset, shm):
    with preload.preload(files.list_samples(dataset), preload.RowFormat(16, ARTEFACT)) as pre:
        order = torch.tensor([5, 0, 3, 3, 1])
        got = list(data.batches(pre, order, 2))
        assert [len(images) for images, _ in got] == [2, 2, 1]
        np.testing.assert_array_equal(torch.cat([i for i, _ in got]).numpy(), [pre.image(i) for i in order.tolist()])
        np.testing.assert_array_equal(torch.cat([m for _, m in got]).numpy(), [pre.mask(i) for i in order.tolist()])
        with pytest.raises(IndexError):
            list(data.batches(pre, [0, 6], 2))


def dihedral(image, flags):
    """hflip, then vflip, then rot90 (counter-clockwise), per flag; numpy reference for to_device_batch."""
    hflip, vflip, rot = flags
    image = image[:, ::-1] if hflip else image
    image = image[::-1] if vflip else image
    return np.rot90(image) if rot else image


def test_device_augmentation_applies_the_same_flip_to_image_and_mask():
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 16, (8, 12, 12), dtype=np.uint8)
    # Red encodes the label, so any misalignment between image and mask shows up as a mismatch.
    images = np.concatenate([masks[..., None] * 16, rng.integers(0, 256, (8, 12, 12, 2), dtype=np.uint8)], -1)
    flags = torch.tensor([[h, v, r] for h in (0, 1) for v in (0, 1) for r in (0, 1)], dtype=torch.bool)
    x, y = data.to_device_batch(torch.from_numpy(images), torch.from_numpy(masks), "cpu", flips=flags)
    for b in range(8):
        np.testing.assert_array_equal(y[b].numpy(), dihedral(masks[b], flags[b].tolist()))
        red = (x[b, 0] * STD[0] + MEAN[0]) * 255
        np.testing.assert_allclose(red.numpy(), dihedral(masks[b], flags[b].tolist()) * 16.0, atol=1e-3)


def test_to_device_batch_normalises_to_channels_last_floats_and_long_masks():
    images = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    masks = torch.randint(0, 16, (2, 4, 4), dtype=torch.uint8)
    x, y = data.to_device_batch(images, masks, "cpu")
    expected = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double()) \
        / torch.tensor(STD).view(1, 3, 1, 1).double()
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)
    assert y.dtype == torch.long and torch.equal(y, masks.long())
    x, _ = data.to_device_batch(images, masks, "cpu", channels_last=False)
    assert x.is_contiguous()
    torch.testing.assert_close(data.normalize(images.permute(0, 3, 1, 2)), data.normalize(images))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shard_covers_each_index_exactly_once(n, world):
    shards = [data.eval_shard(n, rank, world) for rank in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))



def png_bytes(array):
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(array):
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG")
    return out.getvalue()


def test_prepare_converts_parquet_shards_into_a_dataset_folder(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(30, 20), (24, 24), (16, 40)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.choice([0, 2, 255], (h, w)).astype(np.uint8)
        rows.append({"id": f"{'abcdefghij'[i]}" * 25, "image": image, "mask": mask, "jpeg": i == 1,
                     "material": ["Paper", "Glass", "Canvas"][i], "content": "Line art"})
    (tmp_path / "shards").mkdir()
    for shard, part in enumerate([rows[:2], rows[2:]]):
        table = pa.table({
            "id": [r["id"] for r in part],
            "image": [{"bytes": jpeg_bytes(r["image"]) if r["jpeg"] else png_bytes(r["image"]), "path": "x"}
                      for r in part],
            "annotation": [{"bytes": png_bytes(r["mask"]), "path": "y"} for r in part],
            "annotation_rgb": [{"bytes": b"", "path": "z"} for r in part],
            "material": [r["material"] for r in part], "content": [r["content"] for r in part],
            "type": ["t"] * len(part)})
        pq.write_table(table, tmp_path / "shards" / f"train-{shard:05d}-of-00002.parquet", row_group_size=1)
    assert prepare.main(["ingest", "--parquet", str(tmp_path / "shards"), "--out", str(tmp_path / "out")]) == 0
    progress = capsys.readouterr().err
    assert "train-00000-of-00002.parquet: rows 2/2, " in progress and " MB written, ETA " in progress
    assert "train-00001-of-00002.parquet: rows 1/1, " in progress and "\r" not in progress
    samples = files.list_samples(tmp_path / "out")
    assert [s.id for s in samples] == [r["id"] for r in rows]
    for sample, row in zip(samples, rows):
        expected = pixels(io.BytesIO(jpeg_bytes(row["image"]))) if row["jpeg"] else row["image"]
        np.testing.assert_array_equal(files.read_image(sample.image), expected)
        np.testing.assert_array_equal(files.read_mask(sample.mask, ARTEFACT), row["mask"])
    metadata = read_csv(tmp_path / "out" / "metadata.csv")
    assert [(m["id"], m["material"], m["width"], m["height"]) for m in metadata] == \
        [(r["id"], r["material"], str(r["image"].shape[1]), str(r["image"].shape[0])) for r in rows]
    assert files.dataset_scheme(tmp_path / "out") == (ARTEFACT, str(tmp_path / "out" / "classes.json")), \
        "ingest writes ARTeFACT's label scheme beside the data"


def test_prepare_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="pip install pyarrow"):
        prepare.prepare([tmp_path], tmp_path / "out")


def test_download_failure_is_one_line_naming_the_remedy(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as raised:
        prepare.prepare([], tmp_path / "out", download=True)
    assert "\n" not in str(raised.value) and "--parquet" in str(raised.value)


def test_flips_cut_during_the_gather_give_the_same_bytes_as_flipping_the_batch(tmp_path, shm):
    root = write_dataset(tmp_path / "ds", count=5, size=(70, 50))
    with preload.preload(files.list_samples(root), preload.RowFormat(32, ARTEFACT, work_size=70)) as pre:
        rows = np.array([3, 0, 4, 1, 2, 0])
        corners = data.epoch_crops(pre, 32, 42, 0, 0.5, None)[rows]
        flags = torch.rand(len(rows), 3, generator=torch.Generator().manual_seed(1)) < 0.5
        (images, masks), = data.batches(pre, rows, len(rows), data.Crops(corners, flags.numpy()))
        (plain_images, plain_masks), = data.batches(pre, rows, len(rows), data.Crops(corners))
        x_host, y_host = data.to_device_batch(images, masks, "cpu")
        x_device, y_device = data.to_device_batch(plain_images, plain_masks, "cpu", flips=flags)
        assert torch.equal(x_host, x_device) and torch.equal(y_host, y_device)
        assert x_host.is_contiguous(memory_format=torch.channels_last)


def test_batches_come_in_order_from_any_number_of_gather_threads_and_a_failed_gather_raises(tmp_path, shm,
                                                                                            monkeypatch):
    root = write_dataset(tmp_path / "ds", count=9, size=(70, 50))
    with preload.preload(files.list_samples(root), preload.RowFormat(32, ARTEFACT, work_size=70)) as pre:
        rows = np.array([8, 1, 4, 4, 0, 7, 2, 5, 3, 6, 1])
        corners = data.epoch_crops(pre, 32, 5, 0, 0.5, None)[rows]
        flips = np.random.default_rng(5).random((len(rows), 3)) < 0.5
        expected = [(pre.image(r), pre.mask(r)) for r in rows.tolist()]
        for threads in (1, 2, 3):
            monkeypatch.setattr(data, "GATHER_THREADS", threads)
            got = [(i.clone(), m.clone()) for i, m in data.batches(pre, rows, 2, data.Crops(corners, flips))]
            assert [len(i) for i, _ in got] == [2, 2, 2, 2, 2, 1]
            # The same crops, flipped by hand (dihedral) from the rows at the corners, batch after batch.
            images, masks = torch.cat([i for i, _ in got]).numpy(), torch.cat([m for _, m in got]).numpy()
            for j, ((image, mask), (top, left), turn) in enumerate(zip(expected, corners.tolist(), flips.tolist())):
                np.testing.assert_array_equal(images[j], dihedral(image[top:top + 32, left:left + 32], turn))
                np.testing.assert_array_equal(masks[j], dihedral(mask[top:top + 32, left:left + 32], turn))

        def fail(*args):
            raise OSError("read error")
        broken = type("Broken", (), {"size": pre.size, "__len__": lambda self: len(pre), "gather": fail})()
        with pytest.raises(OSError, match="read error"):
            list(data.batches(broken, rows, 2, data.Crops(corners, flips)))


def reversed_crops(pre, seed):
    """Every row of pre, last first, with seeded crop corners (half on damage) and flips: the batches the
    buffer tests cut."""
    rows = np.arange(len(pre))[::-1].copy()
    corners = data.epoch_crops(pre, pre.size, seed, 1, 0.5, None)[rows]
    return rows, data.Crops(corners, np.random.default_rng(seed + 1).random((len(rows), 3)) < 0.5)


def test_reused_buffers_stay_valid_for_one_more_batch_and_are_never_shared_by_two_loaders(tmp_path, shm):
    root = write_dataset(tmp_path / "ds", count=8, size=(70, 50))
    with preload.preload(files.list_samples(root), preload.RowFormat(32, ARTEFACT, work_size=70)) as pre:
        rows, crops = reversed_crops(pre, 3)
        fresh = [(i.clone(), m.clone()) for i, m in data.batches(pre, rows, 2, crops)]
        # The batch before the one just taken is still intact, however fast the gather threads run ahead.
        previous = None
        for k, (images, masks) in enumerate(data.batches(pre, rows, 2, crops, reuse=True)):
            time.sleep(0.05)
            if previous is not None:
                assert torch.equal(previous[0], fresh[k - 1][0]) and torch.equal(previous[1], fresh[k - 1][1])
            previous = images, masks
        # Two loaders at once (here interleaved) fill buffers of their own; once they end, the next call reuses them.
        first = data.batches(pre, rows, 2, crops, reuse=True)
        second = data.batches(pre, rows, 2, crops, reuse=True)
        pointers = set()
        for (a, _), (b, _), (i, _) in zip(first, second, fresh):
            assert a.data_ptr() != b.data_ptr() and torch.equal(a, i) and torch.equal(b, i)
            pointers |= {a.data_ptr(), b.data_ptr()}
        again = {images.data_ptr() for images, _ in data.batches(pre, rows, 2, crops, reuse=True)}
        assert again <= pointers


def test_reused_buffers_give_the_same_batches_as_fresh_ones(tmp_path, shm):
    root = write_dataset(tmp_path / "ds", count=7, size=(70, 50))
    with preload.preload(files.list_samples(root), preload.RowFormat(32, ARTEFACT, work_size=70)) as pre:
        rows, crops = reversed_crops(pre, 2)
        fresh = [data.to_device_batch(i, m, "cpu") for i, m in data.batches(pre, rows, 2, crops)]
        outputs, reused = None, []
        for images, masks in data.batches(pre, rows, 2, crops, reuse=True):
            outputs = data.new_outputs(images) if outputs is None or len(outputs[0]) != len(images) else outputs
            x, y = data.to_device_batch(images, masks, "cpu", out=outputs)
            reused.append((x.clone(), y.clone()))
        for (x, y), (x2, y2) in zip(fresh, reused):
            assert torch.equal(x, x2) and torch.equal(y, y2)
            assert x2.is_contiguous(memory_format=torch.channels_last) and y2.dtype == torch.long
