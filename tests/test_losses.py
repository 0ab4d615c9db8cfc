"""Losses: each one against a per-class, per-pixel loop written here; label 255 and absent classes; hierarchy."""
import math

import pytest
import torch
import torch.nn as nn

from labels import artefact_scheme, scheme_from_dict
from losses import (LOSSES, DiceFocalLoss, DiceLoss, FocalLoss, HierarchicalLoss,
                    build_loss, hierarchy_targets, label_tables)

IGNORE = 255
ARTEFACT = artefact_scheme()
# DESIGN.md's table, written out again here: the coarse id of each ARTeFACT class.
COARSE_GROUPS = {0: {0}, 1: {1, 2, 4, 7, 9, 13, 14}, 2: {3, 5, 6, 10}, 3: {8, 11, 12, 15}}
# A mural scheme with the clean class in the middle and another ignore id: nothing may assume 0 and 255.
MURAL = scheme_from_dict({"classes": [{"id": i, "name": n, "colour": c} for i, (n, c) in enumerate(
    (("crack", "#FF0000"), ("flaking", "#00FF00"), ("clean", "#000000"), ("loss", "#0000FF"), ("stain", "#FFFF00")))],
    "clean": 2, "ignore": 9, "groups": [{"name": "structural", "ids": [0, 1, 3]}, {"name": "clean", "ids": [2]},
                                        {"name": "surface", "ids": [4]}]}, "mural")
MURAL_GROUPS = {0: {0, 1, 3}, 1: {2}, 2: {4}}


def pixels(logits, target):
    """(probabilities as python lists, label) for every valid pixel, softmax done by hand in float64."""
    batch, classes, height, width = logits.shape
    out = []
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                label = int(target[b, y, x])
                if label == IGNORE:
                    continue
                values = [float(logits[b, c, y, x]) for c in range(classes)]
                top = max(values)
                exps = [math.exp(v - top) for v in values]
                out.append(([e / sum(exps) for e in exps], label))
    return out


def reference_dice(logits, target, weight=None, smooth=1.0):
    classes = logits.shape[1]
    weight = [1.0] * classes if weight is None else [float(w) for w in weight]
    total, norm = 0.0, 0.0
    for c in range(classes):
        inter = prob_sum = target_sum = 0.0
        for probs, label in pixels(logits, target):
            inter += probs[c] * (label == c)
            prob_sum += probs[c]
            target_sum += label == c
        if target_sum == 0:
            continue
        dice = (2 * inter + smooth) / (prob_sum + target_sum + smooth)
        total += weight[c] * (1 - dice)
        norm += weight[c]
    return total / norm if norm else 0.0


def reference_focal(logits, target, weight=None, gamma=2.0):
    classes = logits.shape[1]
    weight = [1.0] * classes if weight is None else [float(w) for w in weight]
    total, norm = 0.0, 0.0
    for probs, label in pixels(logits, target):
        p = probs[label]
        total += weight[label] * -((1 - p) ** gamma) * math.log(p)
        norm += weight[label]
    return total / norm if norm else 0.0


def batch(classes=5, absent=None, ignored=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(2, classes, 5, 6, generator=generator)
    target = torch.randint(0, classes, (2, 5, 6), generator=generator)
    if absent is not None:
        target[target == absent] = (absent + 1) % classes
    if ignored:
        target[0, :2, :3] = IGNORE
        target[1, 4, :] = IGNORE
    return logits, target


WEIGHTS = [None, [0.5, 2.0, 1.0, 3.0, 0.25]]
CASES = [dict(), dict(absent=3), dict(ignored=False)]


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("case", CASES)
def test_dice_matches_per_class_loop(weight, case):
    logits, target = batch(**case)
    loss = DiceLoss(weight)(logits, target)
    assert loss.item() == pytest.approx(reference_dice(logits, target, weight), rel=1e-5)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("case", CASES)
def test_focal_matches_per_pixel_loop(weight, case):
    logits, target = batch(**case)
    loss = FocalLoss(weight)(logits, target)
    assert loss.item() == pytest.approx(reference_focal(logits, target, weight), rel=1e-5)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("case", CASES)
def test_dicefocal_is_half_dice_plus_half_focal(weight, case):
    logits, target = batch(**case)
    expected = 0.5 * reference_dice(logits, target, weight) + 0.5 * reference_focal(logits, target, weight)
    assert DiceFocalLoss(weight)(logits, target).item() == pytest.approx(expected, rel=1e-5)
    custom = DiceFocalLoss(weight, dice_weight=0.8, focal_weight=0.3)(logits, target).item()
    expected = 0.8 * reference_dice(logits, target, weight) + 0.3 * reference_focal(logits, target, weight)
    assert custom == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("case", CASES)
def test_ce_is_torch_weighted_cross_entropy_and_focal_with_gamma_zero(weight, case):
    logits, target = batch(**case)
    loss = build_loss("ce", weight)(logits, target)
    torch_weight = None if weight is None else torch.tensor(weight)
    expected = nn.CrossEntropyLoss(weight=torch_weight, ignore_index=IGNORE)(logits, target)
    torch.testing.assert_close(loss, expected)
    assert loss.item() == pytest.approx(reference_focal(logits, target, weight, gamma=0.0), rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_pixels_change_neither_value_nor_gradient(name):
    logits, target = batch()
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    changed = torch.where(ignored, 50 * torch.randn_like(logits), logits)
    loss_fn = build_loss(name, WEIGHTS[1])
    first, second = logits.clone().requires_grad_(), changed.clone().requires_grad_()
    loss_a, loss_b = loss_fn(first, target), loss_fn(second, target)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-7)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(first.grad, second.grad, rtol=0, atol=1e-7)
    assert (first.grad[ignored] == 0).all()


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_reach_every_valid_pixel(name):
    logits, target = batch()
    logits.requires_grad_()
    build_loss(name, WEIGHTS[1])(logits, target).backward()
    valid = target != IGNORE
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().sum(1)[valid] > 0).all()


@pytest.mark.parametrize("name", LOSSES)
def test_all_ignored_batch_gives_zero_not_nan(name):
    logits, _ = batch()
    logits.requires_grad_()
    target = torch.full((2, 5, 6), IGNORE)
    loss = build_loss(name, WEIGHTS[1])(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert (logits.grad == 0).all()


def test_dice_leaves_classes_absent_from_the_target_out_of_the_mean():
    logits, target = batch(absent=3)
    weight = torch.tensor(WEIGHTS[1])
    heavier_absent = weight.clone()
    heavier_absent[3] = 100.0
    torch.testing.assert_close(DiceLoss(weight)(logits, target), DiceLoss(heavier_absent)(logits, target))


def test_dice_penalises_probability_mass_on_an_absent_class():
    logits, target = batch(absent=3)
    leaking = logits.clone()
    leaking[:, 3] += 3.0
    assert DiceLoss()(leaking, target) > DiceLoss()(logits, target)


@pytest.mark.parametrize("name", LOSSES)
def test_weights_enter_as_a_weighted_mean_so_their_scale_does_not_matter(name):
    logits, target = batch()
    weight = torch.tensor(WEIGHTS[1])
    torch.testing.assert_close(build_loss(name, weight)(logits, target), build_loss(name, 7 * weight)(logits, target))
    torch.testing.assert_close(build_loss(name, torch.ones(5))(logits, target), build_loss(name)(logits, target))


@pytest.mark.parametrize("name", LOSSES)
def test_losses_compute_in_float32_from_half_logits(name):
    logits, target = batch()
    half = logits.to(torch.bfloat16)
    loss = build_loss(name)(half, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, build_loss(name)(half.float(), target))


def test_class_weights_are_float32_buffers_that_move_with_the_module():
    loss = build_loss("dicefocal", [1.0] * 5)
    assert set(dict(loss.named_buffers())) == {"dice.weight", "focal.weight"}
    assert loss.dice.weight.dtype == torch.float32


def test_weight_length_must_match_classes():
    logits, target = batch()
    with pytest.raises(ValueError, match="4 entries"):
        DiceLoss([1.0] * 4)(logits, target)


def test_build_loss_names():
    assert isinstance(build_loss("dice"), DiceLoss)
    assert isinstance(build_loss("focal"), FocalLoss) and build_loss("focal").gamma == 2.0
    assert isinstance(build_loss("dicefocal"), DiceFocalLoss)
    assert build_loss("ce").gamma == 0.0
    with pytest.raises(ValueError, match="dicefocal"):
        build_loss("lovasz")


@pytest.mark.parametrize("scheme, groups", [(ARTEFACT, COARSE_GROUPS), (MURAL, MURAL_GROUPS)])
def test_derived_labels_for_every_fine_id(scheme, groups):
    fine = torch.tensor(list(range(scheme.num_classes)) + [scheme.ignore]).view(1, 1, -1)
    for mask in (fine, fine.to(torch.uint8)):
        targets = hierarchy_targets(mask, label_tables(scheme))
        assert targets["fine"] is mask
        for position, label in enumerate(fine.flatten().tolist()):
            ignored = label == scheme.ignore
            coarse = scheme.ignore if ignored else next(g for g, ids in groups.items() if label in ids)
            binary = scheme.ignore if ignored else int(label != scheme.clean)
            assert targets["coarse"][0, 0, position].item() == coarse, label
            assert targets["binary"][0, 0, position].item() == binary, label
    assert ARTEFACT.head_names["coarse"] == ["Clean", "Structural loss", "Surface deposits", "Additions & optical"]


def hierarchy_batch(scheme=ARTEFACT, seed=0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, scheme.num_classes, (2, 6, 7), generator=generator)
    target[0, 0, :] = scheme.ignore
    outputs = {"fine": torch.randn(2, scheme.num_classes, 6, 7, generator=generator),
               "coarse": torch.randn(2, len(scheme.groups), 6, 7, generator=generator),
               "binary": torch.randn(2, 2, 6, 7, generator=generator)}
    return outputs, target


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("head_weights", [(0.2, 0.3, 0.5), (1.0, 0.0, 2.0)])
@pytest.mark.parametrize("scheme, groups", [(ARTEFACT, COARSE_GROUPS), (MURAL, MURAL_GROUPS)])
def test_hierarchical_loss_is_weighted_sum_of_single_head_losses(name, head_weights, scheme, groups):
    outputs, target = hierarchy_batch(scheme)
    ignore = scheme.ignore
    coarse_of = {f: g for g, ids in groups.items() for f in ids} | {ignore: ignore}
    coarse = target.clone().apply_(lambda v: coarse_of[v])
    binary = target.clone().apply_(lambda v: ignore if v == ignore else int(v != scheme.clean))
    class_weights = torch.linspace(0.5, 2.0, scheme.num_classes)
    expected = (head_weights[0] * build_loss(name, ignore_index=ignore)(outputs["binary"], binary)
                + head_weights[1] * build_loss(name, ignore_index=ignore)(outputs["coarse"], coarse)
                + head_weights[2] * build_loss(name, class_weights, ignore)(outputs["fine"], target))
    loss = HierarchicalLoss(name, scheme, class_weights, head_weights)(outputs, target)
    torch.testing.assert_close(loss, expected)


def test_hierarchical_default_head_weights():
    outputs, target = hierarchy_batch()
    assert HierarchicalLoss("dice", ARTEFACT).head_weights == (0.2, 0.3, 0.5)
    torch.testing.assert_close(HierarchicalLoss("dice", ARTEFACT)(outputs, target),
                               HierarchicalLoss("dice", ARTEFACT, head_weights=(0.2, 0.3, 0.5))(outputs, target))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", LOSSES)
def test_losses_do_not_synchronise_with_the_host_on_cuda(name):
    outputs, target = hierarchy_batch()
    outputs = {k: v.cuda().requires_grad_() for k, v in outputs.items()}
    target = target.cuda()
    flat = build_loss(name, torch.linspace(0.5, 2.0, 16)).cuda()
    hierarchical = HierarchicalLoss(name, ARTEFACT, torch.linspace(0.5, 2.0, 16)).cuda()
    for _ in range(2):
        # First calls build the cached label tables and cuBLAS/allocator state; only steady state is checked.
        flat(outputs["fine"], target).backward()
        hierarchical(outputs, target).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flat(outputs["fine"], target).backward()
        hierarchical(outputs, target).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = build_loss(name, torch.linspace(0.5, 2.0, 16))(outputs["fine"].detach().cpu(), target.cpu())
    torch.testing.assert_close(flat(outputs["fine"], target).cpu(), expected, rtol=1e-5, atol=1e-6)
