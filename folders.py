"""What predict.py reads and writes: the images of the files and folders it is given (sub-folders, files Pillow
cannot read and its own earlier outputs skipped, and named), and the files it writes into --out, listed in a
manifest there so that it never replaces, or reads back as an image, a file it did not write."""
import json
import sys
from pathlib import Path

from PIL import Image

from files import atomic_write
from labels import UserError

MANIFEST = ".predict-outputs.json"
# What to do when --out fills up or cannot be written (files.write_error's line ends with it).
WRITE_FIX = "make room there or pass another --out (the maps of the images before it are complete, in areas.csv)"
SHOWN_SKIPPED = 8


def readable_suffixes():
    """File suffixes of the formats Pillow can open (.png, .jpg, .tif, .bmp, .webp, ...)."""
    return {suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN}


def claimed(folder):
    """Names (relative to folder) that predict.py wrote into folder, from its manifest; empty without one."""
    path = Path(folder) / MANIFEST
    try:
        return set(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def outputs_of(image, scheme):
    """Every name predict.py may write into --out for one image (mask, overlay, report, gallery pictures)."""
    stem = image.stem
    names = [f"{stem}_mask.png", f"{stem}_overlay.png", f"{stem}_overlay.jpg", f"{stem}_report.json",
             f"gallery/{stem}.jpg", f"gallery/{stem}_thumb.jpg"]
    return names + [f"gallery/{stem}_{class_id}.png" for class_id in (*range(scheme.num_classes), scheme.ignore)]


def claim(out, names):
    """Adds names to out's manifest (written before the files themselves, so a crash leaves none unlisted)."""
    files = claimed(out) | set(names)
    atomic_write(Path(out) / MANIFEST, lambda tmp: tmp.write_text(json.dumps({"written_by": "predict.py",
                                                                              "files": sorted(files)}) + "\n"),
                 fix=WRITE_FIX)


def run_outputs(truth):
    """The files of a run besides each image's (scores.csv with --truth)."""
    return ["areas.csv", "index.html"] + (["scores.csv"] if truth else [])


def claim_outputs(out, images, scheme, truth):
    """Refuses, before anything is written, a run that would replace a file in out that predict.py did not
    write (a user's a_mask.png beside a.png, when --out is the images' folder); then claims the run's files."""
    ours = claimed(out)
    planned = run_outputs(truth) + [name for image in images for name in outputs_of(image, scheme)]
    taken = [name for name in planned if name not in ours and (Path(out) / name).exists()]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise UserError(f"--out {out}: {Path(out) / taken[0]}{more} exists and was not written by predict.py, which "
                        "never replaces a file it did not write; pass another --out, or move the file")
    claim(out, run_outputs(truth))


def _folder_images(folder, out, suffixes, skipped):
    ours = claimed(folder)
    images = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name in ours or any(name.startswith(entry.name + "/") for name in ours):
            skipped["outputs"] += 1
        elif entry.is_dir():
            why = "the --out folder" if entry.resolve() == out.resolve() else "a folder: pass it on its own to read it"
            skipped["named"].append(f"{entry.name}/ ({why})")
        elif entry.suffix.lower() not in suffixes:
            skipped["named"].append(f"{entry.name} (not an image format Pillow reads)")
        else:
            images.append(entry)
    return images


def list_images(paths, out):
    """Image files named directly or found (not recursively) in the named folders, in a stable order; what a
    folder holds besides images is named in a note line, and predict.py's own outputs there are left out."""
    suffixes, skipped, images = readable_suffixes(), {"named": [], "outputs": 0}, []
    for path in map(Path, paths):
        if path.is_dir():
            images.extend(_folder_images(path, Path(out), suffixes, skipped))
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"{path}: not found; pass image files or folders of images")
    if skipped["named"]:
        shown = ", ".join(skipped["named"][:SHOWN_SKIPPED])
        more = f" and {len(skipped['named']) - SHOWN_SKIPPED} more" if len(skipped["named"]) > SHOWN_SKIPPED else ""
        print(f"note: skipped {shown}{more}", file=sys.stderr, flush=True)
    if skipped["outputs"]:
        print(f"note: skipped {skipped['outputs']} files predict.py wrote there earlier (listed in its {MANIFEST})",
              file=sys.stderr, flush=True)
    if not images:
        raise UserError(f"no images in {' '.join(map(str, paths))}; pass image files or folders of images")
    seen = {}
    for path in images:
        if path.stem in seen and seen[path.stem] != path:
            raise UserError(f"{path} and {seen[path.stem]} would write the same outputs; rename one or run them "
                            "separately")
        seen[path.stem] = path
    return list(dict.fromkeys(images))
