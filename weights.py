"""Class pixel frequencies -> class weights for the losses; the CLI writes them as JSON for train.py.

With n_c the labelled pixels of class c (the label scheme's ignore id left out) and f_c = n_c / sum(n), the raw
weights are

- ``inverse``                  1 / f_c
- ``inverse_sqrt``             1 / sqrt(f_c)
- ``inverse_sqrt_log_scaled``  ln(1 + 1 / sqrt(f_c))  (default; the earlier prototype's "balanced"
  before its rescale-and-clip): the logarithm compresses the inverse square root, so on ARTeFACT the
  rarest/commonest ratio is 7.7:1 where ``inverse`` gives about 62,000:1
- ``median_frequency``         median(f) / f_c  (Eigen & Fergus 2015; median over present classes). The
  median is a common factor, so after normalisation this equals ``inverse``; kept under its usual name
- ``effective_number``         (1 - beta) / (1 - beta ** n_c), beta = 0.9999  (Cui et al. 2019). With
  pixel counts every class above ~10^5 pixels gets almost the same weight; only the rare ones stand out
- ``none``                     1

Then, in this order:

1. Cap: if max / min exceeds ``max_ratio`` (default 36, the ratio the earlier prototype trained well
   with; its 734:1 collapsed), clip in log space to a window of width ``max_ratio`` centred on the
   geometric mean of the extreme weights: the smallest weights are raised and the largest lowered by the
   same factor, so max / min becomes exactly ``max_ratio``. Clipping keeps the order of the weights.
   ``max_ratio=None`` (``--max-ratio inf``) turns the cap off.
2. Normalise so the weights of the present classes average 1.
3. Classes with no pixels get the largest weight of the present classes: they are at least as rare
   as the rarest seen one, no inf or nan appears, and the cap still holds.

So for every method a rarer class never gets a smaller weight than a commoner one.

CLI: ``python weights.py --data DIR|synthetic [--classes FILE] --method M [--max-ratio 36] [--fold K ...]
[--out FILE.json]`` prints class, pixels, share and weight, and writes JSON (default
runs/class_weights/<dataset>-<method>.json) with the scheme's class names, which train.py checks against its
own scheme when it reads the file back. It takes train.py's flags with train.py's defaults and counts masks at
the working scale training sees. With --fold it counts that fold's training images only (the split flags as
train.py's), which is what a ``--class-weights FILE`` for that fold must hold; without it, every image, test
folds included.
"""
import errno
import json
import sys
from pathlib import Path

import numpy as np

from config import METHODS, build_parser, parse_args
from files import displayed_size, list_samples, read_mask, resize_labels, scaled_shape
from labels import UserError, run_cli
from writes import atomic_write

DEFAULT_METHOD = "inverse_sqrt_log_scaled"
DEFAULT_MAX_RATIO = 36.0
_CHUNK = 1 << 24


def count_pixels(masks, scheme):
    """Pixels per class (int64, one per class id of the label scheme) over masks: an (N, H, W) array or an
    iterable of arrays.

    Vectorised ``np.bincount`` over each mask in chunks of ``_CHUNK`` pixels (bincount widens bytes to
    int64, so a 100-megapixel mask in one piece would need 800 MB). The scheme's ignore id is not counted; any
    other value outside its class ids raises UserError.
    """
    num_classes = scheme.num_classes
    if isinstance(masks, np.ndarray) and masks.ndim < 3:
        masks = [masks]
    totals = np.zeros(256, dtype=np.int64)
    for mask in masks:
        mask = np.asarray(mask)
        if mask.dtype != np.uint8:
            if mask.size and (mask.min() < 0 or mask.max() > 255):
                raise UserError(f"mask values {mask.min()}..{mask.max()} do not fit 0-255; masks hold class ids "
                                f"0-{num_classes - 1} and {scheme.ignore}")
            mask = mask.astype(np.uint8)
        flat = mask.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            totals += np.bincount(flat[start:start + _CHUNK], minlength=256)
    outside = totals.copy()
    outside[:num_classes] = outside[scheme.ignore] = 0
    bad = np.flatnonzero(outside)
    if len(bad):
        shown = ", ".join(str(v) for v in bad[:8].tolist()) + (", ..." if len(bad) > 8 else "")
        raise UserError(f"mask labels {shown} are not in the label scheme (class ids 0-{num_classes - 1}, ignore "
                        f"{scheme.ignore}); fix the masks")
    return totals[:num_classes]


def _raw_weights(counts, method, beta):
    frequency = counts / counts.sum()
    if method == "inverse":
        return 1 / frequency
    if method == "inverse_sqrt":
        return 1 / np.sqrt(frequency)
    if method == "inverse_sqrt_log_scaled":
        return np.log1p(1 / np.sqrt(frequency))
    if method == "median_frequency":
        return np.median(frequency) / frequency
    if method == "effective_number":
        return (1 - beta) / -np.expm1(counts * np.log(beta))
    return np.ones_like(frequency)


def compute_weights(counts, method=DEFAULT_METHOD, max_ratio=DEFAULT_MAX_RATIO, beta=0.9999):
    """Class weights (float64, same length as counts): mean 1 over present classes, max / min <= max_ratio.

    The formulas, the cap and the zero-count rule are in the module docstring.
    """
    if method not in METHODS:
        raise UserError(f"unknown class-weight method {method!r}: choose one of {', '.join(METHODS)}")
    if max_ratio is not None and not max_ratio >= 1:
        raise UserError(f"--max-ratio {max_ratio}: must be at least 1 (inf for no cap)")
    counts = np.asarray(counts, dtype=np.float64)
    if (counts < 0).any():
        raise ValueError(f"pixel counts must not be negative: {counts.tolist()}")
    present = counts > 0
    if not present.any():
        raise UserError("no labelled pixels to weigh: every mask is empty or ignored; check --data")
    weights = _raw_weights(counts[present], method, beta)
    low, high = weights.min(), weights.max()
    if max_ratio is not None and high > low * max_ratio:
        centre, half_width = np.sqrt(low * high), np.sqrt(max_ratio)
        weights = np.clip(weights, centre / half_width, centre * half_width)
    weights = weights / weights.mean()
    result = np.full(len(counts), weights.max())
    result[present] = weights
    return result


def save_weights(path, method, counts, weights, max_ratio, names, images=None):
    """JSON with the method, cap, class names (of the label scheme), pixel counts, weights and which images were
    counted (images: the fold's split settings, None for every image); ``load_weights`` reads the weights back."""
    record = {"method": method,
              "max_ratio": None if max_ratio is None or np.isinf(max_ratio) else float(max_ratio),
              "classes": list(names),
              "counts": [int(n) for n in counts],
              "weights": [float(w) for w in weights],
              "images": images or "all"}
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"),
                     fix="pass --out with a writable path")
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror}); pass --out with a writable path") from None


def load_weights(path, scheme):
    """Weights (float64, one per class of the label scheme) from a JSON file written by ``save_weights``; a file
    whose class names are not the scheme's (weights of another dataset) is refused."""
    fix = "write it with: python weights.py --data DIR --method METHOD"
    try:
        record = json.loads(Path(path).read_text())
        weights = np.asarray(record["weights"], dtype=np.float64)
    except FileNotFoundError:
        raise UserError(f"{path}: class-weight file not found; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a class-weight file ({exc!r}); {fix}") from None
    num_classes = scheme.num_classes
    if weights.shape != (num_classes,) or not np.isfinite(weights).all() or (weights <= 0).any():
        raise UserError(f"{path}: needs {num_classes} finite positive weights, found {weights.tolist()}; {fix}")
    names = record.get("classes")
    if names is not None and list(names) != list(scheme.names):
        c = next((c for c, (a, b) in enumerate(zip(names, scheme.names)) if a != b), None)
        differ = f"{len(names)} names" if c is None else f"class {c} is {names[c]!r} there, {scheme.names[c]!r} here"
        raise UserError(f"{path}: weights of other classes than the label scheme's ({differ}); {fix} --classes FILE")
    return weights


def resolve_class_weights(spec, counts, scheme, max_ratio=DEFAULT_MAX_RATIO, save_to=None):
    """Weights for ``--class-weights``: a method name (computed from the class pixel ``counts`` of the label
    scheme's classes, see count_pixels, and written as JSON to ``save_to`` when given) or a JSON file path."""
    if spec in METHODS:
        weights = compute_weights(counts, spec, max_ratio)
        if save_to is not None:
            save_weights(save_to, spec, counts, weights, max_ratio, scheme.names)
        return weights
    if spec.endswith(".json") or Path(spec).exists():
        return load_weights(spec, scheme)
    raise UserError(f"--class-weights {spec}: give a method ({', '.join(METHODS)}) or a .json file")


def format_table(counts, weights, names):
    """One line per class: id, name, pixels, share of labelled pixels in %, weight."""
    share = 100 * np.asarray(counts) / max(int(np.sum(counts)), 1)
    width = max(14, *map(len, names))
    lines = [f"{'id':>2}  {'class':<{width}} {'pixels':>13} {'share %':>8} {'weight':>8}"]
    for c, name in enumerate(names):
        lines.append(f"{c:>2}  {name:<{width}} {int(counts[c]):>13,} {share[c]:>8.4f} {weights[c]:>8.4f}")
    return "\n".join(lines)


# The settings that decide a fold's training images; a weights file made for another fold is refused.
FOLD_KEYS = ("split", "fold", "folds", "seed", "inner_frac", "select")


def check_images(path, cfg):
    """Refuses a --class-weights FILE counted on another fold's training images (its test images may be this
    run's training images and the reverse); returns a note when it counted every image (test fold included)."""
    images = json.loads(Path(path).read_text()).get("images")
    if isinstance(images, dict):
        other = [f"--{k.replace('_', '-')} {images.get(k)} (this run: {cfg[k]})" for k in FOLD_KEYS
                 if k in images and images[k] != cfg[k]]
        if other:
            raise UserError(f"--class-weights {path}: counted on other training images ({'; '.join(other)}); "
                            "write it with weights.py --fold and this run's split flags")
        return None
    return (f"note: --class-weights {path}: counted on {'every image' if images == 'all' else 'unrecorded images'}, "
            "the test fold's included; weights.py --fold K counts a fold's training images only")


def working_counts(samples, size, work_size, scheme, copies=1):
    """Pixels per class of the samples' masks at the working scale training sees (preload's counts: resized
    like files.load_working, padding not counted), times the rows each sample makes (offline copies)."""
    def masks():
        for sample in samples:
            mask = read_mask(sample.mask, scheme, displayed_size(sample.image))
            yield resize_labels(mask, *scaled_shape(*mask.shape, size, work_size))
    return count_pixels(masks(), scheme) * copies


def _parser():
    parser = build_parser()
    parser.description = __doc__.splitlines()[0] + " (train.py's flags and defaults say which images)"
    group = parser.add_argument_group("class weights")
    group.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help="how counts become weights")
    group.add_argument("--out", help="JSON file to write (default runs/class_weights/<dataset>-<method>.json)")
    return parser


def main(argv=None):
    return run_cli(lambda: _write_for_dataset(parse_args(argv, _parser)))


def _write_for_dataset(args):
    # Imported here: data pulls in torch, which config.py's --help (it reads METHODS) must not wait for.
    import data

    if args.data is not None and not args.data.strip():
        raise UserError(f"--data {args.data!r}: empty (an unset variable in a job script?); pass a dataset folder "
                        "or 'synthetic'")
    cfg = dict(vars(args), data=args.data or "synthetic", run_dir=args.run_dir or "runs/class_weights")
    root = data.resolve_data(cfg["data"], args.synthetic_count, args.synthetic_size)
    # The folder is checked first: one that is not a dataset is refused before any note about its scheme.
    samples, images = list_samples(root), None
    scheme, source = data.data_scheme(cfg["data"], args.classes_file)
    copies = 4 if args.offline_aug else 1
    if "fold" in args.given_flags:
        samples, images = data.part_samples(cfg, "train"), {key: cfg[key] for key in FOLD_KEYS}
    counts = working_counts(samples, args.img_size, args.work_size, scheme, copies)
    max_ratio = None if np.isinf(args.max_ratio) else args.max_ratio
    weights = compute_weights(counts, args.method, max_ratio)
    fold = f"-fold{args.fold}" if images else ""
    out = Path(args.out) if args.out else Path("runs") / "class_weights" / f"{Path(root).name}{fold}-{args.method}.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "a file is in the way" if exc.errno in (errno.EEXIST, errno.ENOTDIR) else exc.strerror
        raise UserError(f"--out {out}: cannot create {out.parent} ({reason}); pass a path in a writable "
                        "folder") from None
    save_weights(out, args.method, counts, weights, max_ratio, scheme.names, images)
    print(f"label scheme: {source}")
    print(format_table(counts, weights, scheme.names))
    which = f"the {len(samples)} training images of fold {args.fold}" if images else f"all {len(samples)} images"
    print(f"method {args.method}, max/min {weights.max() / weights.min():.2f}, counted {which}, wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
