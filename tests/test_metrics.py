"""metrics.py: IoU from one confusion matrix over a set, checked against brute-force pixel counts."""
import numpy as np
import pytest
import torch

from labels import artefact_scheme
from metrics import confusion, iou_report, mean_iou

ARTEFACT = artefact_scheme()


def brute_force_report(pred, target, num_classes, ignore, clean):
    """Per-class IoU, mIoU and damage-vs-clean IoU counted pixel by pixel."""
    valid = target != ignore
    iou = {}
    for c in range(num_classes):
        union = np.sum(((pred == c) | (target == c)) & valid)
        iou[c] = np.sum((pred == c) & (target == c) & valid) / union if union else None
    damage_t, damage_p = (target != clean) & valid, (pred != clean) & valid
    binary = np.sum(damage_t & damage_p) / np.sum(damage_t | damage_p)
    return iou, np.mean([v for v in iou.values() if v is not None]), binary


@pytest.mark.parametrize("num_classes, ignore, clean", [(ARTEFACT.num_classes, 255, 0), (5, 7, 3), (2, 255, 0),
                                                        (2, 2, 1)])
def test_miou_and_damage_iou_match_brute_force_pixel_counts(num_classes, ignore, clean):
    rng = np.random.default_rng(num_classes * 10 + clean)
    target = rng.integers(0, num_classes, (3, 17, 19))
    absent = 1 if clean != 1 else 0
    if num_classes > 2:
        target[target == absent] = clean      # one class absent from the ground truth
    target[:, :2] = ignore                     # ignored border
    pred = rng.integers(0, num_classes, (3, 17, 19))
    names = [f"class {c}" for c in range(num_classes)]
    cm = confusion(torch.from_numpy(pred), torch.from_numpy(target), num_classes, ignore)
    report = iou_report(cm, names, clean)
    iou, miou, binary = brute_force_report(pred, target, num_classes, ignore, clean)
    for c in range(num_classes):
        assert report["iou"][names[c]] == (pytest.approx(iou[c]) if iou[c] is not None else None)
    assert report["miou"] == pytest.approx(miou)
    assert report["absent"] == ([names[absent]] if num_classes > 2 else [])
    assert report["binary_iou"] == pytest.approx(binary)
    if num_classes == 2:
        assert report["binary_iou"] == pytest.approx(report["iou"][names[1 - clean]]), \
            "with two classes damage-vs-clean is the damage class"


def test_confusion_is_one_matrix_over_the_set_not_a_mean_of_batches():
    target = torch.tensor([[0, 0, 0, 1]]), torch.tensor([[1, 1, 1, 1]])
    pred = torch.tensor([[0, 0, 0, 0]]), torch.tensor([[1, 1, 1, 1]])
    cm = sum(confusion(p, t, 2, 255) for p, t in zip(pred, target))
    # Class 1: 4 hits out of a union of 5 pixels over the set (a per-batch mean would give (0 + 1) / 2).
    assert iou_report(cm, ["Clean", "Damage"])["iou"]["Damage"] == pytest.approx(4 / 5)


def test_mean_iou_of_a_stack_follows_iou_report_on_absent_and_empty_classes():
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 20, (6, 5, 5))
    stack[1, 2, :] = stack[1, :, 2] = 0        # class 2 neither in the truth nor predicted: left out
    stack[2, 4, :] = 0                         # class 4 absent from the truth but predicted: IoU 0, counted
    stack[3] = 0                               # an empty matrix: 0
    expected = [iou_report(torch.from_numpy(cm), [str(c) for c in range(5)])["miou"] for cm in stack]
    assert mean_iou(stack).tolist() == pytest.approx(expected, abs=1e-15)
    assert mean_iou(stack.reshape(2, 3, 5, 5)).shape == (2, 3)
