"""metrics.py: IoU from one confusion matrix over a set, checked against brute-force pixel counts."""
import numpy as np
import pytest
import torch

from labels import CLASS_NAMES, NUM_CLASSES
from metrics import confusion, iou_report


def test_miou_matches_brute_force_pixel_count():
    rng = np.random.default_rng(0)
    target = rng.integers(0, NUM_CLASSES, (3, 17, 19))
    target[target == 7] = 3                      # class 7 absent from the ground truth
    target[:, :2] = 255                          # ignored border
    pred = rng.integers(0, NUM_CLASSES, (3, 17, 19))
    pred[pred == 9] = 0                          # class 9 never predicted
    cm = confusion(torch.from_numpy(pred), torch.from_numpy(target), NUM_CLASSES)
    report = iou_report(cm, CLASS_NAMES)
    valid = target != 255
    ious = []
    for c in range(NUM_CLASSES):
        inter = np.sum((pred == c) & (target == c) & valid)
        union = np.sum(((pred == c) | (target == c)) & valid)
        expected = inter / union if union else None
        assert report["iou"][CLASS_NAMES[c]] == pytest.approx(expected) if expected is not None \
            else report["iou"][CLASS_NAMES[c]] is None
        if union:
            ious.append(inter / union)
    assert report["miou"] == pytest.approx(np.mean(ious))
    assert report["absent"] == [CLASS_NAMES[7]]
    damage_t, damage_p = (target > 0) & valid, (pred > 0) & valid
    assert report["binary_iou"] == pytest.approx(np.sum(damage_t & damage_p) / np.sum(damage_t | damage_p))


def test_confusion_is_one_matrix_over_the_set_not_a_mean_of_batches():
    target = torch.tensor([[0, 0, 0, 1]]), torch.tensor([[1, 1, 1, 1]])
    pred = torch.tensor([[0, 0, 0, 0]]), torch.tensor([[1, 1, 1, 1]])
    cm = sum(confusion(p, t, 2) for p, t in zip(pred, target))
    # Class 1: 4 hits out of a union of 5 pixels over the set (a per-batch mean would give (0 + 1) / 2).
    assert iou_report(cm, ["Clean", "Damage"])["iou"]["Damage"] == pytest.approx(4 / 5)
