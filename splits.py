"""Splits over source images: single, k-fold, or one fold per material/content, kept in a JSON manifest.

Every job of a cross-validation run reads the same manifest, so all agree on the folds. Splits are made
over source images, never over augmented copies (offline copies are added after the split, to training only).
"""
import json
from pathlib import Path

import numpy as np

from files import atomic_write, list_samples, read_metadata
from labels import UserError

SPLIT_SCHEMES = ("single", "kfold", "material", "content")


def _val_folds(root, scheme, ids, folds, val_frac, seed):
    """(group names or None, validation ids of each fold)."""
    if scheme in ("material", "content"):
        metadata = read_metadata(root)
        if not metadata:
            raise UserError(f"--split {scheme}: {Path(root) / 'metadata.csv'} not found; it needs id and "
                            f"{scheme} columns (or use --split kfold)")
        missing = [i for i in ids if not metadata.get(i, {}).get(scheme)]
        if missing:
            raise UserError(f"--split {scheme}: {Path(root) / 'metadata.csv'} has no {scheme} for {missing[0]} "
                            f"({len(missing)} ids); add the column or use --split kfold")
        groups = sorted({metadata[i][scheme] for i in ids})
        if len(groups) < 2:
            raise UserError(f"--split {scheme}: only one {scheme} ({groups[0]}) in the dataset; use --split kfold")
        return groups, [[i for i in ids if metadata[i][scheme] == g] for g in groups]
    if len(ids) < 2:
        raise UserError(f"{root}: a split needs at least 2 images, found {len(ids)}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if scheme == "single":
        if not 0 < val_frac < 1:
            raise UserError(f"val_frac {val_frac}: must be between 0 and 1")
        n_val = min(len(ids) - 1, max(1, round(len(ids) * val_frac)))
        return None, [sorted(order[:n_val])]
    if not 2 <= folds <= len(ids):
        raise UserError(f"--folds {folds}: k-fold needs 2 to {len(ids)} folds for {len(ids)} images")
    return None, [sorted(part.tolist()) for part in np.array_split(np.array(order, dtype=object), folds)]


def _splits(root, scheme, ids, folds, val_frac, seed):
    """The manifest dict and the path it lives at: root/splits-SCHEME-FOLDS-SEED.json, where FOLDS is the
    fold count for kfold, the number of groups for material/content and valPERCENT for single."""
    if scheme not in SPLIT_SCHEMES:
        raise UserError(f"--split {scheme}: unknown; use one of {', '.join(SPLIT_SCHEMES)}")
    groups, val = _val_folds(root, scheme, ids, folds, val_frac, seed)
    tag = f"val{round(val_frac * 100)}" if scheme == "single" else len(val)
    manifest = {"scheme": scheme, "folds": len(val), "seed": seed, "val_frac": val_frac if scheme == "single" else None,
                "groups": groups, "ids": ids, "val": val}
    return manifest, Path(root) / f"splits-{scheme}-{tag}-{seed}.json"


def _write_manifest(manifest, path):
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    except OSError as exc:
        raise UserError(f"{path}: cannot write the split manifest ({exc.strerror}); make {path.parent} "
                        "writable") from None


def split_ids(root, scheme="kfold", fold=0, folds=3, val_frac=0.2, seed=42):
    """(train_ids, val_ids) of one fold, read from the manifest in root (written first if absent).

    Every job of a cross-validation run reads the same manifest, so all agree on the folds; a manifest
    whose ids no longer match the dataset is a UserError rather than a silent re-split.
    """
    ids = [s.id for s in list_samples(root)]
    manifest, path = _splits(root, scheme, ids, folds, val_frac, seed)
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            stored = list(manifest["ids"])
            if len(manifest["val"]) != manifest["folds"]:
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path}: unreadable split manifest; delete it to re-split") from None
        if stored != ids:
            extra, missing = sorted(set(ids) - set(stored)), sorted(set(stored) - set(ids))
            detail = f"new {extra[0]}" if extra else f"missing {missing[0]}" if missing else "different order"
            raise UserError(f"{path}: split manifest lists {len(stored)} images, the dataset has {len(ids)} "
                            f"({detail}); delete the manifest to re-split (earlier runs' folds will change)")
    else:
        _write_manifest(manifest, path)
    if not 0 <= fold < manifest["folds"]:
        names = f" ({', '.join(manifest['groups'])})" if manifest["groups"] else ""
        raise UserError(f"--fold {fold}: --split {scheme} has folds 0..{manifest['folds'] - 1}{names}")
    val_set = set(manifest["val"][fold])
    return [i for i in ids if i not in val_set], [i for i in ids if i in val_set]
