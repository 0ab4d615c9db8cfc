"""Splits over source images: each fold's test set, and an inner validation set carved from its training images.

Schemes: single (one test set of val_frac), kfold, or one fold per material/content value (leave one out).
Model selection uses the inner validation set only; the test fold is scored once, at the end. Splits are
made over source images, never over augmented copies (offline copies are added after the split, to
training only). A JSON manifest keeps the folds, so every job of a cross-validation agrees, together with
everything they depend on (ids, the grouping column's values, scheme, folds, seed, fractions): when any of
it changes the manifest is refused, never silently reused. Its fold lists follow from those inputs (a run's
config records them, and results are compared by them), so a list edited by hand is refused too: custom folds
are not supported.
"""
import collections
import hashlib
import json
from pathlib import Path

import numpy as np

from files import list_samples, read_metadata
from labels import UserError
from writes import atomic_write

SPLIT_SCHEMES = ("single", "kfold", "material", "content")

# Everything a split follows from besides the dataset: a manifest records these and is refused when one changes.
Protocol = collections.namedtuple("Protocol", "scheme folds seed val_frac inner_frac",
                                  defaults=("kfold", 3, 42, 0.2, 0.15))


def _groups(root, scheme, ids):
    """{id: group value} of the material/content column for those schemes, else {}."""
    if scheme not in ("material", "content"):
        return {}
    metadata = read_metadata(root)
    if not metadata:
        raise UserError(f"--split {scheme}: {Path(root) / 'metadata.csv'} not found; it needs id and "
                        f"{scheme} columns (or use --split kfold)")
    missing = [i for i in ids if not metadata.get(i, {}).get(scheme)]
    if missing:
        raise UserError(f"--split {scheme}: {Path(root) / 'metadata.csv'} has no {scheme} for {missing[0]} "
                        f"({len(missing)} ids); add the column or use --split kfold")
    return {i: metadata[i][scheme] for i in ids}


def group_names(root, scheme):
    """The sorted values of the material or content column over the dataset's images: fold k of that
    leave-one-group-out split tests on the k-th (the manifest's group_names)."""
    return sorted(set(_groups(root, scheme, [s.id for s in list_samples(root)]).values()))


def _test_folds(scheme, ids, groups, folds, val_frac, seed):
    """Test ids of each fold."""
    if groups:
        names = sorted(set(groups.values()))
        if len(names) < 2:
            raise UserError(f"--split {scheme}: only one {scheme} ({names[0]}) in the dataset; use --split kfold")
        return [[i for i in ids if groups[i] == name] for name in names]
    if len(ids) < 3:
        raise UserError(f"a split needs at least 3 images (train, inner validation, test), found {len(ids)}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if scheme == "single":
        if not 0 < val_frac < 1:
            raise UserError(f"val_frac {val_frac}: must be between 0 and 1")
        return [sorted(order[:min(len(ids) - 2, max(1, round(len(ids) * val_frac)))])]
    if not 2 <= folds <= len(ids):
        raise UserError(f"--folds {folds}: k-fold needs 2 to {len(ids)} folds for {len(ids)} images")
    return [sorted(part.tolist()) for part in np.array_split(np.array(order, dtype=object), folds)]


def _inner(ids, test, inner_frac, seed, fold):
    """Inner validation ids carved from the fold's training ids (at least one, leaving at least one)."""
    held = set(test)
    train = [i for i in ids if i not in held]
    if len(train) < 2:
        raise UserError(f"fold {fold} leaves {len(train)} training images; an inner validation split needs 2 or more "
                        "(use fewer folds or --select last)")
    order = [train[i] for i in np.random.default_rng([seed, fold]).permutation(len(train))]
    return sorted(order[:min(len(train) - 1, max(1, round(len(train) * inner_frac)))])


def make_manifest(root, protocol):
    """The manifest of a dataset folder: its inputs (ids, groups, the protocol) and the test/inner ids per
    fold."""
    scheme, folds, seed, val_frac, inner_frac = protocol
    if scheme not in SPLIT_SCHEMES:
        raise UserError(f"--split {scheme}: unknown; use one of {', '.join(SPLIT_SCHEMES)}")
    if not 0 < inner_frac < 1:
        raise UserError(f"--inner-frac {inner_frac}: must be between 0 and 1, e.g. 0.15")
    ids = [s.id for s in list_samples(root)]
    groups = _groups(root, scheme, ids)
    test = _test_folds(scheme, ids, groups, folds, val_frac, seed)
    return {"scheme": scheme, "folds": len(test), "seed": seed, "val_frac": val_frac if scheme == "single" else None,
            "inner_frac": inner_frac, "ids": ids, "groups": groups,
            "group_names": sorted(set(groups.values())) or None, "test": test,
            "inner": [_inner(ids, part, inner_frac, seed, k) for k, part in enumerate(test)]}


def default_manifest_path(root, cache_dir, protocol):
    """Where a manifest lives unless --splits names one: a cache folder (never the dataset folder, which may
    be read-only), named by the dataset's folder name and absolute path so two datasets never share one, and
    by the protocol, so that another --inner-frac gets its own manifest (with the same test folds) rather
    than a refusal of the first one's."""
    scheme, folds, seed, val_frac, inner_frac = protocol
    root = Path(root).resolve()
    tag = f"val{round(val_frac * 100)}" if scheme == "single" else folds if scheme == "kfold" else "groups"
    inner = "" if inner_frac == Protocol().inner_frac else f"-inner{inner_frac:g}"
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{root.name}-{digest}-{scheme}-{tag}-{seed}{inner}.json"


def _difference(stored, fresh):
    """A few words on the first input that differs between a stored manifest and the dataset now."""
    for key in ("scheme", "folds", "seed", "val_frac", "inner_frac"):
        if stored.get(key) != fresh[key]:
            return f"{key} {stored.get(key)} -> {fresh[key]}"
    old, new = list(stored.get("ids", [])), fresh["ids"]
    if old != new:
        extra, missing = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        return f"new image {extra[0]}" if extra else f"image {missing[0]} gone" if missing else "ids reordered"
    old_groups = stored.get("groups") or {}
    for i in new:
        if old_groups.get(i) != fresh["groups"].get(i):
            return f"{fresh['scheme']} of {i} {old_groups.get(i)} -> {fresh['groups'].get(i)}"
    return None


MANIFEST_KEYS = ("scheme", "ids", "test", "inner")


def _read_manifest(path):
    """The stored manifest; a file that is not one (another JSON file, say) is refused naming it, never called a
    manifest to delete."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict) or not all(key in stored for key in MANIFEST_KEYS) or not all(
            isinstance(stored[key], list) for key in MANIFEST_KEYS[1:]):
        raise UserError(f"{path}: not a split manifest (train.py writes JSON with {', '.join(MANIFEST_KEYS)}); pass "
                        "--splits a manifest, or a path that does not exist yet to write one there")
    return stored


def _edited(stored, fresh):
    """A few words on the first fold list of the stored manifest that differs from what its inputs give."""
    for part in ("test", "inner"):
        for fold, (old, new) in enumerate(zip(stored[part], fresh[part])):
            if old != new:
                extra, missing = sorted(set(old) - set(new)), sorted(set(new) - set(old))
                change = (f"{extra[0]} added" if extra else f"{missing[0]} removed" if missing else "reordered")
                return f"fold {fold} {part} list: {change}"
        if len(stored[part]) != len(fresh[part]):
            return f"{len(stored[part])} {part} lists for {len(fresh[part])} folds"
    return None


def split_ids(root, protocol=Protocol(), fold=0, manifest_path=None):
    """(train_ids, inner_ids, test_ids) of one fold of the protocol, from the manifest at manifest_path
    (written if absent).

    A manifest whose inputs no longer match the dataset (an image added or removed, a corrected material,
    another seed) is a UserError naming what changed, rather than folds that silently leak.
    """
    fresh = make_manifest(root, protocol)
    path = Path(manifest_path) if manifest_path else None
    if path is not None and path.is_file():
        stored = _read_manifest(path)
        try:
            changed = _difference(stored, fresh)
        except (AttributeError, TypeError):
            raise UserError(f"{path}: unreadable split manifest; delete it to re-split") from None
        if changed:
            raise UserError(f"{path}: split manifest no longer matches the dataset ({changed}); delete it (or pass "
                            "another --splits) to re-split; earlier runs' folds will change")
        edited = _edited(stored, fresh)
        if edited:
            raise UserError(f"{path}: its fold lists were edited ({edited}); folds follow from the scheme, seed and "
                            "fractions it records, so an edit would be silently ignored: undo it, or delete the "
                            "file to re-split (custom folds are not supported)")
    elif path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(fresh, indent=1)))
        except OSError as exc:
            raise UserError(f"{path}: cannot write the split manifest ({exc.strerror}); pass --splits FILE in a "
                            "writable folder") from None
    if not 0 <= fold < fresh["folds"]:
        names = f" ({', '.join(fresh['group_names'])})" if fresh["group_names"] else ""
        raise UserError(f"--fold {fold}: --split {protocol.scheme} has folds 0..{fresh['folds'] - 1}{names}")
    test, inner = set(fresh["test"][fold]), set(fresh["inner"][fold])
    ids = fresh["ids"]
    return ([i for i in ids if i not in test and i not in inner], [i for i in ids if i in inner],
            [i for i in ids if i in test])
