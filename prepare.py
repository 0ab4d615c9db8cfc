"""ARTeFACT ingestion, dataset checks and label-scheme files (user-facing CLI).

    python prepare.py ingest --parquet DIR_OF_SHARDS --out data/artefact   # or --download (Hugging Face hub)
    python prepare.py check data/artefact [--classes FILE]                 # one line per problem
    python prepare.py classes DIR                                          # ARTeFACT's classes.json, to edit

ingest writes the dataset folder every other script reads: images/ID.png, annotations/ID.png, metadata.csv and
classes.json (ARTeFACT's label scheme).
"""
import argparse
import io
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from files import (INGEST_MARKER, SCHEME_FILE, atomic_write, dataset_scheme, list_samples,
                   open_image, read_mask, read_metadata, rgb_array, write_error, write_metadata, write_scheme)
from labels import UserError, artefact_scheme, progress, run_cli, scheme_summary
from strips import exif_orientation

HF_DATASET = "danielaivanova/damaged-media"


def _parquet_files(sources):
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(source.rglob("*.parquet"))
        elif source.is_file():
            files.append(source)
        else:
            raise UserError(f"--parquet {source}: not found; pass the folder or files of the parquet shards")
    if not files:
        raise UserError(f"--parquet {' '.join(map(str, sources))}: no .parquet files; pass the shards' folder")
    return files


def _download(target):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError("--download needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return snapshot_download(HF_DATASET, repo_type="dataset", allow_patterns=["data/*.parquet"],
                                 local_dir=target)
    except Exception as exc:  # the hub client raises many types (offline, auth, HTTP); all end the same way
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"--download: could not fetch {HF_DATASET} from the Hugging Face hub ({reason}); "
                        "check the network, or download data/*.parquet elsewhere and pass --parquet DIR") from None


def _cell_bytes(value):
    return value.get("bytes") if isinstance(value, dict) else value


MAX_ID_LENGTH = 200


def _png_bytes(payload, where, is_mask):
    """PNG bytes as stored, or re-encoded losslessly; images are turned upright by their EXIF orientation
    (masks are ids as stored), so image and mask line up in every later reader."""
    image = Image.open(io.BytesIO(payload))
    upright = is_mask or exif_orientation(image) == 1
    if image.format == "PNG" and upright:
        return payload
    if is_mask and image.format == "JPEG":
        raise UserError(f"{where}: annotation is a JPEG (lossy ids); this parquet file cannot be used")
    if not upright:
        image = ImageOps.exif_transpose(image)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _empty_output(out, overwrite):
    """out/images and out/annotations, refusing to mix a new dataset into an old one unless overwrite. The
    ingest marker (files.INGEST_MARKER) goes in before anything is removed or written, so until the ingest has
    finished every reader refuses the folder. Sub-folders are not part of a dataset and are left in place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: not empty; pass a new folder, or --overwrite to replace its dataset")
    _make_folder(out)
    atomic_write(out / INGEST_MARKER, lambda tmp: tmp.write_text("prepare.py ingest started here and has not "
                                                                 "finished; rerun it with --overwrite\n"), fix=FIX)
    for sub in ("images", "annotations"):
        for path in sorted((out / sub).iterdir()) if (out / sub).is_dir() else ():
            if path.is_dir() and not path.is_symlink():
                print(f"note: {path}: a folder, not part of the dataset; left in place", file=sys.stderr)
            else:
                path.unlink()
    (out / "metadata.csv").unlink(missing_ok=True)
    (out / SCHEME_FILE).unlink(missing_ok=True)
    _make_folder(out / "images")
    _make_folder(out / "annotations")
    return out


# What a full disk or a read-only --out during ingest asks of the user.
FIX = "free space (or pass another --out) and rerun prepare.py ingest with --overwrite"


def _make_folder(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc, fix=FIX) or UserError(f"--out {folder}: cannot create the folder "
                                                             f"({exc.strerror}); pass a writable folder") from None


def prepare(parquet, out, download=False, batch_rows=4, overwrite=False):
    """ARTeFACT parquet shards -> out/images/ID.png, out/annotations/ID.png, out/metadata.csv.

    Streams one shard at a time, `batch_rows` rows at a time (pyarrow holds at most one row group), so
    memory stays far below the 4 GB dataset. PNG bytes are written as stored; other image formats are
    re-encoded losslessly as PNG.
    """
    if download:
        parquet = [_download(parquet[0] if parquet else None)]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("prepare needs pyarrow to read parquet: pip install pyarrow") from None
    shards = _parquet_files(parquet)
    out = _empty_output(out, overwrite)
    rows, seen = [], set()
    for file in shards:
        try:
            shard = pq.ParquetFile(file)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...; any of them means an unusable file
            raise UserError(f"{file}: not a readable parquet file ({str(exc).splitlines()[0][:120]}); "
                            "download it again") from None
        names = set(shard.schema_arrow.names)
        if not {"id", "image", "annotation"} <= names:
            raise UserError(f"{file}: columns {sorted(names)} lack id/image/annotation; is it {HF_DATASET}?")
        columns = ["id", "image", "annotation"] + [c for c in ("material", "content") if c in names]
        before, written = len(rows), 0
        show = progress(f"{file.name}: rows", shard.metadata.num_rows)
        for batch in shard.iter_batches(batch_size=batch_rows, columns=columns):
            for record in batch.to_pylist():
                where = f"{file} row {len(rows) - before + 1}"
                if str(record["id"]) in seen:
                    raise UserError(f"{where}: id {record['id']} appears twice; pass each shard once")
                seen.add(str(record["id"]))
                rows.append(_prepare_row(where, record, out))
                written += sum((out / sub / f"{rows[-1][0]}.png").stat().st_size for sub in ("images", "annotations"))
                show(len(rows) - before, f", {written / 2**20:.1f} MB written")
        print(f"{file.name}: {len(rows) - before} images", flush=True)
    atomic_write(out / "metadata.csv", lambda tmp: write_metadata(tmp, rows), fix=FIX)
    write_scheme(out, artefact_scheme())
    (out / INGEST_MARKER).unlink()
    return out


def _prepare_row(where, record, out):
    if record["id"] is None:
        raise UserError(f"{where}: id is empty (null); this is not the {HF_DATASET} layout")
    sample_id = str(record["id"])
    if len(sample_id) > MAX_ID_LENGTH:
        raise UserError(f"{where}: id is {len(sample_id)} characters long (at most {MAX_ID_LENGTH} make a file "
                        f"name); this is not the {HF_DATASET} layout")
    where = f"{where} (id {sample_id})"
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", sample_id):
        raise UserError(f"{where}: id is not a safe file name; this is not the {HF_DATASET} layout")
    image, annotation = _cell_bytes(record["image"]), _cell_bytes(record["annotation"])
    if not image or not annotation:
        raise UserError(f"{where}: empty image or annotation; download the shard again")
    try:
        image, annotation = _png_bytes(image, where, False), _png_bytes(annotation, where, True)
        size = Image.open(io.BytesIO(image)).size
        mask_size = Image.open(io.BytesIO(annotation)).size
    except UserError:
        raise
    except Exception as exc:  # any decoder failure means the stored bytes are unusable
        raise UserError(f"{where}: undecodable image bytes ({str(exc)[:120]}); download the shard again") from None
    if size != mask_size:
        raise UserError(f"{where}: annotation is {mask_size[0]}x{mask_size[1]} but the image is {size[0]}x{size[1]}")
    atomic_write(out / "images" / f"{sample_id}.png", lambda tmp: tmp.write_bytes(image), len(image), FIX)
    atomic_write(out / "annotations" / f"{sample_id}.png", lambda tmp: tmp.write_bytes(annotation), len(annotation),
                 FIX)
    return sample_id, record.get("material") or "", record.get("content") or "", size[0], size[1]


def check(root, classes=None):
    """Reads every pair of a dataset folder the way training does, masks by the dataset's label scheme (--classes
    FILE, else ROOT/classes.json, else ARTeFACT's with a note); returns a two-line summary."""
    samples = list_samples(root)
    scheme, source = dataset_scheme(root, classes)
    read_metadata(root)
    counts = np.zeros(256, dtype=np.int64)
    for sample in samples:
        image = open_image(sample.image)
        rgb_array(image, sample.image)
        mask = read_mask(sample.mask, scheme, image_size=(image.height, image.width))
        counts += np.bincount(mask.ravel(), minlength=256)
    present = [name for c, name in enumerate(scheme.names) if counts[c]]
    absent = [name for c, name in enumerate(scheme.names) if not counts[c]]
    return (f"ok: {len(samples)} image/mask pairs in {root}; {counts[:scheme.num_classes].sum()} labelled pixels, "
            f"{counts[scheme.ignore]} ignored; classes present: {', '.join(present) or 'none'}"
            + (f"; absent: {', '.join(absent)}" if absent else "")
            + f"\nlabel scheme ({source}): {scheme_summary(scheme)}")


def write_default_scheme(folder):
    """FOLDER/classes.json with ARTeFACT's scheme, a template for another dataset's; an existing one is kept."""
    path = Path(folder) / SCHEME_FILE
    if path.exists():
        raise UserError(f"{path}: exists; edit it, or remove it to write ARTeFACT's scheme there")
    if not Path(folder).is_dir():
        raise UserError(f"{folder}: folder not found; pass the dataset folder")
    return write_scheme(folder, artefact_scheme())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("ingest", help="ARTeFACT parquet shards -> dataset folder")
    p.add_argument("--parquet", nargs="+", default=[],
                   help="parquet files or folders (with --download: the folder to download into)")
    p.add_argument("--out", default="data/artefact", help="dataset folder to write")
    p.add_argument("--download", action="store_true", help=f"fetch {HF_DATASET} from the Hugging Face hub first")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out")
    c = commands.add_parser("check", help="validate every image/mask pair of a dataset folder")
    c.add_argument("root", help="dataset folder (images/ + annotations/)")
    c.add_argument("--classes", dest="classes_file", metavar="FILE", help="label scheme JSON (default: "
                   "ROOT/classes.json, else ARTeFACT's, with a note)")
    s = commands.add_parser("classes", help="write ARTeFACT's label scheme as DIR/classes.json (a template)")
    s.add_argument("folder", help="dataset folder to write classes.json into")
    return run_cli(_command, parser.parse_args(argv))


def _command(args):
    if args.command == "check":
        print(check(args.root, args.classes_file))
        return
    if args.command == "classes":
        print(f"wrote {write_default_scheme(args.folder)}")
        return
    if not args.parquet and not args.download:
        raise UserError("ingest: pass --parquet DIR_OR_FILES (or --download)")
    print(f"wrote {prepare(args.parquet, args.out, download=args.download, overwrite=args.overwrite)}")


if __name__ == "__main__":
    sys.exit(main())
