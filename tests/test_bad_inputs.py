"""Broken datasets: each one gives a single UserError line naming the culprit file, in Python and from the CLI."""
import builtins
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare
from conftest import module_folder
from files import write_scheme
from labels import UserError, artefact_scheme

REPO = Path(__file__).resolve().parents[1]
SIZE = (40, 32)  # (W, H)


def good_pair(root, name="good"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    write_scheme(root, artefact_scheme())
    Image.fromarray(np.full((SIZE[1], SIZE[0], 3), 120, np.uint8)).save(root / "images" / f"{name}.png")
    Image.fromarray(np.zeros((SIZE[1], SIZE[0]), np.uint8)).save(root / "annotations" / f"{name}.png")


def png(path, array):
    Image.fromarray(array).save(path)


def corrupt_png(root):
    good_pair(root)
    (root / "images" / "good.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def truncated_file(root):
    good_pair(root)
    noisy = np.random.default_rng(0).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    png(root / "images" / "good.png", noisy)
    payload = (root / "images" / "good.png").read_bytes()
    (root / "images" / "good.png").write_bytes(payload[:len(payload) // 2])


def size_mismatch(root):
    good_pair(root)
    png(root / "annotations" / "good.png", np.zeros((10, 20), np.uint8))


def wrong_label_values(root):
    good_pair(root)
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    mask[0, :3] = (16, 40, 254)
    png(root / "annotations" / "good.png", mask)


def rgba_mask_with_foreign_colour(root):
    good_pair(root)
    rgba = np.zeros((SIZE[1], SIZE[0], 4), np.uint8)
    rgba[..., 3] = 255
    rgba[2, 2, :3] = (1, 2, 3)
    png(root / "annotations" / "good.png", rgba)


def palette_mask_with_indices_beyond_the_classes(root):
    good_pair(root)
    mask = Image.fromarray(np.full((SIZE[1], SIZE[0]), 99, np.uint8), mode="L").convert("P")
    mask.putpalette(sum(([i, i, i] for i in range(256)), []))
    mask.save(root / "annotations" / "good.png")


def mask_16_bit_with_large_values(root):
    good_pair(root)
    png(root / "annotations" / "good.png", np.full((SIZE[1], SIZE[0]), 1000, np.uint16))


def image_without_mask(root):
    good_pair(root)
    good_pair(root, "lonely")
    (root / "annotations" / "lonely.png").unlink()


def mask_without_image(root):
    good_pair(root)
    good_pair(root, "orphan")
    (root / "images" / "orphan.png").unlink()


def empty_folder(root):
    root.mkdir(parents=True)


def empty_subfolders(root):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()


def non_image_file(root):
    good_pair(root)
    (root / "images" / "good.png").write_text("id,material\nx,Paper\n")


def unsupported_format(root):
    good_pair(root)
    (root / "images" / "good.png").unlink()
    Image.fromarray(np.zeros((SIZE[1], SIZE[0], 3), np.uint8)).save(root / "images" / "good.bmp")


def jpeg_mask(root):
    good_pair(root)
    (root / "annotations" / "good.png").unlink()
    Image.fromarray(np.zeros((SIZE[1], SIZE[0]), np.uint8)).save(root / "annotations" / "good.jpg")


def float_mask(root):
    good_pair(root)
    (root / "annotations" / "good.png").unlink()
    Image.fromarray(np.zeros((SIZE[1], SIZE[0]), np.float32)).save(root / "annotations" / "good.tif")


def unreadable_permissions(root):
    good_pair(root)
    (root / "annotations" / "good.png").chmod(0)


# name, builder, culprit (relative to the dataset folder), words the message must contain, and whether to also run
# the real `python prepare.py check DIR` process (each start imports torch, ~1.5 s of CPU, so a few rows cover the
# process-level wiring while prepare.main() covers every row).
CASES = [
    ("corrupt png", corrupt_png, "images/good.png", "not a readable image", True),
    ("truncated file", truncated_file, "images/good.png", "truncated", False),
    ("size mismatch", size_mismatch, "annotations/good.png", "20x10 (WxH) but its image is 40x32", True),
    ("wrong label values", wrong_label_values, "annotations/good.png",
     "label values 16, 40, 254 are not in the label scheme (class ids 0-15, ignore 255)", False),
    ("rgba mask, non-palette colour", rgba_mask_with_foreign_colour, "annotations/good.png", "#010203", False),
    ("palette mask, index beyond the classes", palette_mask_with_indices_beyond_the_classes,
     "annotations/good.png", "label values 99", False),
    ("16-bit mask", mask_16_bit_with_large_values, "annotations/good.png", "label values 1000", True),
    ("image without mask", image_without_mask, "images/lonely.png", "has no mask", False),
    ("mask without image", mask_without_image, "annotations/orphan.png", "has no image", False),
    ("empty folder", empty_folder, "images", "folder not found", True),
    ("empty subfolders", empty_subfolders, "", "no images", False),
    ("non-image file", non_image_file, "images/good.png", "not a readable image", False),
    ("unsupported format", unsupported_format, "images/good.bmp", "convert it to .png", False),
    ("jpeg mask", jpeg_mask, "annotations/good.jpg", "JPEG", False),
    ("float mask", float_mask, "annotations/good.tif", "mode F is not supported", False),
    ("unreadable permissions", unreadable_permissions, "annotations/good.png", "permission denied", True),
]

# Root reads every file whatever its mode bits, so a denied read is simulated at open() for root.
DENY_AS_ROOT = """
import builtins, os, runpy, sys
real_open, denied = builtins.open, sys.argv.pop(1)
def guarded_open(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and os.fspath(file) == denied:
        raise PermissionError(13, "Permission denied", denied)
    return real_open(file, *args, **kwargs)
builtins.open = guarded_open
sys.argv = ["prepare.py"] + sys.argv[1:]
runpy.run_path("prepare.py", run_name="__main__")
"""


def denied_file(name, root):
    if name == "unreadable permissions" and os.geteuid() == 0:
        return root / "annotations" / "good.png"
    return None


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory):
    """Every broken dataset, with the real CLI started on the marked ones side by side."""
    with module_folder(request, tmp_path_factory, "corpus") as base:
        roots, runs = {}, {}
        for i, (name, build, _, _, cli) in enumerate(CASES):
            roots[name] = root = base / f"case{i:02d}"
            build(root)
            if cli:
                deny = denied_file(name, root)
                command = [sys.executable, "-c", DENY_AS_ROOT, str(deny)] if deny else [sys.executable, "prepare.py"]
                runs[name] = subprocess.Popen(command + ["check", str(root)], cwd=REPO, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finished = {}
        for name, process in runs.items():
            _, stderr = process.communicate(timeout=120)
            finished[name] = stderr, process.returncode
        yield roots, finished


def deny_reading(monkeypatch, path):
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)


@pytest.mark.parametrize("name, build, culprit, words, cli", CASES, ids=[case[0] for case in CASES])
def test_broken_dataset_gives_one_line_naming_the_file(name, build, culprit, words, cli, corpus, monkeypatch,
                                                       capsys):
    roots, finished = corpus
    root = roots[name]
    deny = denied_file(name, root)
    if deny is not None:
        deny_reading(monkeypatch, deny)
    with pytest.raises(UserError) as raised:
        prepare.check(root)
    message = str(raised.value)
    assert "\n" not in message
    assert str(root / culprit) in message and words in message

    assert prepare.main(["check", str(root)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    monkeypatch.undo()

    if cli:
        stderr, returncode = finished[name]
        assert returncode == 2, stderr
        assert "Traceback" not in stderr
        assert stderr.splitlines() == [f"error: {message}"]
