"""Segmentation losses (dice, focal, dice+focal, cross-entropy, hierarchical) with class weights and the ignore id
left out.

Every loss takes logits (B, C, H, W) and a target (B, H, W) of class ids, computes in float32
(``logits.float()``), and treats pixels labelled ``ignore_index`` (the label scheme's ignore id, by default 255)
as absent: they add nothing to any
sum, dice denominators included, so changing the logits there changes neither the value nor the gradient.
No loss loops over classes in Python or reads values back to the host, so they run inside a CUDA graph
or a compiled step without syncs.

Class weights ``w`` (length C, positive) enter every loss as a weighted mean:

- dice: ``sum_c w_c * L_c / sum_c w_c`` over the classes that count (those present in the batch target);
- focal and cross-entropy: ``sum_i w[y_i] * l_i / sum_i w[y_i]`` over the valid pixels ``i``, the same
  reduction as ``nn.CrossEntropyLoss(weight=w, ignore_index=255)``.

Without weights every ``w_c`` is 1. A batch whose pixels are all ignored gives a loss of 0 (not nan) that
still backpropagates (zero gradients).

Hierarchical heads: the binary (clean / any damage) and coarse (the label scheme's groups) labels are derived
from the fine mask with the scheme's tables (``label_tables``); see ``HierarchicalLoss``.
"""
import torch
import torch.nn as nn

from distributed import all_reduce
from labels import DEFAULT_IGNORE

LOSSES = ("dicefocal", "dice", "focal", "ce")


def label_tables(scheme):
    """Lookup tables over all 256 byte values of a scheme with groups: fine id -> coarse (group) id and fine id ->
    binary id (0 the clean id, 1 every damage id). Every other value maps to the scheme's ignore id."""
    coarse = torch.full((256,), scheme.ignore, dtype=torch.long)
    binary = coarse.clone()
    coarse[:scheme.num_classes] = torch.tensor(scheme.coarse_of_fine)
    binary[:scheme.num_classes] = (torch.arange(scheme.num_classes) != scheme.clean).long()
    return coarse, binary


def hierarchy_targets(mask, tables):
    """Targets for the three heads from a fine mask (B, H, W): dict(fine, coarse, binary), through the
    label_tables (on the mask's device). Pixels labelled with the ignore id stay ignored in every head."""
    coarse, binary = tables
    index = mask.long()
    return {"fine": mask, "coarse": coarse[index], "binary": binary[index]}


def _as_weight(weight):
    return None if weight is None else torch.as_tensor(weight, dtype=torch.float32).flatten().clone()


def _checked_weight(weight, num_classes):
    if weight is not None and weight.numel() != num_classes:
        raise ValueError(f"class weights have {weight.numel()} entries but the logits have {num_classes} classes")
    return weight


def _valid_target(target, ignore_index):
    """(valid mask (B, H, W) bool, target with ignored pixels replaced by class 0 so it can index)."""
    target = target.long()
    valid = target != ignore_index
    return valid, target.masked_fill(~valid, 0)


_TINY = torch.finfo(torch.float32).tiny


class DiceLoss(nn.Module):
    """Multiclass soft dice, each class pooled over the whole batch and all valid pixels.

    With p = softmax(logits) and t the one-hot target, sums over valid pixels of the batch give, per class c,
    ``dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)`` and ``L_c = 1 - dice_c``.

    Classes absent from the batch target (no valid pixel labelled c) are left out of the mean: their dice
    would be ``smooth / (sum(p_c) + smooth)``, close to 0 for any predicted mass over thousands of pixels,
    a near-constant penalty with almost no gradient that drowns the classes actually present. Probability
    mass predicted for an absent class is still penalised, because softmax takes it from the present
    classes and lowers their intersections. The loss is ``sum_c w_c * L_c / sum_c w_c`` over present classes;
    a batch with no valid pixel gives 0.

    ``sums`` and ``from_sums`` split the loss at its per-class sums, so a batch spread over ranks or
    micro-batches is scored from the sums of the whole batch (see ``global_loss``).
    """
    linear = False

    def __init__(self, weight=None, smooth=1.0, ignore_index=DEFAULT_IGNORE):
        super().__init__()
        self.register_buffer("weight", _as_weight(weight))
        self.smooth = smooth
        self.ignore_index = ignore_index

    def sums(self, logits, target):
        logits = logits.float()
        valid, target = _valid_target(target, self.ignore_index)
        valid = valid.unsqueeze(1).float()
        probs = logits.softmax(1) * valid
        one_hot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0) * valid
        dims = (0, 2, 3)
        return {"inter": (probs * one_hot).sum(dims), "pred": probs.sum(dims), "target": one_hot.sum(dims)}

    def from_sums(self, sums):
        weight = _checked_weight(self.weight, sums["target"].numel())
        dice = (2 * sums["inter"] + self.smooth) / (sums["pred"] + sums["target"] + self.smooth)
        counted = (sums["target"] > 0).float()
        if weight is not None:
            counted = counted * weight
        return ((1 - dice) * counted).sum() / counted.sum().clamp_min(_TINY)

    def forward(self, logits, target):
        return self.from_sums(self.sums(logits, target))


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017) with a class-weighted mean over valid pixels.

    Per valid pixel i with true class y_i and p_i = softmax(logits)[y_i]:
    ``l_i = -(1 - p_i) ** gamma * log(p_i)``; the loss is ``sum_i w[y_i] * l_i / sum_i w[y_i]``.
    With ``gamma=0`` this is exactly ``nn.CrossEntropyLoss(weight=w, ignore_index=255)``, except that an
    all-ignored batch gives 0 instead of nan. Classes absent from the batch simply have no pixels; no
    special rule is needed. The loss is linear in its numerator, so micro-batches need only the
    denominator of the whole batch, which the labels alone give (``label_sums``).
    """
    linear = True

    def __init__(self, weight=None, gamma=2.0, ignore_index=DEFAULT_IGNORE):
        super().__init__()
        self.register_buffer("weight", _as_weight(weight))
        self.gamma = gamma
        self.ignore_index = ignore_index

    def _pixel_weight(self, target):
        valid, target = _valid_target(target, self.ignore_index)
        return (valid.float() if self.weight is None else self.weight[target] * valid), target

    def label_sums(self, target):
        """The denominator, from the labels alone."""
        return {"weight": self._pixel_weight(target)[0].sum()}

    def sums(self, logits, target):
        logits = logits.float()
        _checked_weight(self.weight, logits.shape[1])
        pixel_weight, target = self._pixel_weight(target)
        nll = -logits.log_softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
        if self.gamma:
            # 1 - p via expm1 stays accurate near p = 1; the floor keeps the gradient of (1 - p) ** gamma
            # finite for gamma < 1 when p rounds to exactly 1.
            nll = (-torch.expm1(-nll)).clamp_min(1e-12).pow(self.gamma) * nll
        return {"weighted": (pixel_weight * nll).sum(), "weight": pixel_weight.sum()}

    def from_sums(self, sums):
        return sums["weighted"] / sums["weight"].clamp_min(_TINY)

    def forward(self, logits, target):
        return self.from_sums(self.sums(logits, target))


class _Sum(nn.Module):
    """A weighted sum of losses, each on its own part of the model output and target, in sums form."""

    def __init__(self, losses, weights):
        super().__init__()
        for name, loss in losses.items():
            self.add_module(name, loss)
        self.names = list(losses)
        self.weights = dict(zip(losses, weights))
        self.linear = all(loss.linear for loss in losses.values())

    def parts(self, outputs, target):
        raise NotImplementedError

    def label_sums(self, target):
        """Only for linear parts (focal, ce): their denominators."""
        return {f"{name}/{k}": v for name, (_, t) in self.parts(None, target).items()
                for k, v in getattr(self, name).label_sums(t).items()}

    def sums(self, outputs, target):
        return {f"{name}/{k}": v for name, (logits, t) in self.parts(outputs, target).items()
                for k, v in getattr(self, name).sums(logits, t).items()}

    def from_sums(self, sums):
        total = 0.0
        for name in self.names:
            prefix = f"{name}/"
            total = total + self.weights[name] * getattr(self, name).from_sums(
                {k[len(prefix):]: v for k, v in sums.items() if k.startswith(prefix)})
        return total

    def forward(self, outputs, target):
        return self.from_sums(self.sums(outputs, target))


class DiceFocalLoss(_Sum):
    """``dice_weight * DiceLoss + focal_weight * FocalLoss``, both with the same class weights (0.5 / 0.5)."""

    def __init__(self, weight=None, dice_weight=0.5, focal_weight=0.5, ignore_index=DEFAULT_IGNORE):
        super().__init__({"dice": DiceLoss(weight, ignore_index=ignore_index),
                          "focal": FocalLoss(weight, ignore_index=ignore_index)}, (dice_weight, focal_weight))

    def parts(self, outputs, target):
        return {"dice": (outputs, target), "focal": (outputs, target)}


def build_loss(name, class_weights=None, ignore_index=DEFAULT_IGNORE):
    """Loss module by ``--loss`` name: dicefocal | dice | focal | ce (ce = FocalLoss with gamma 0)."""
    if name == "dicefocal":
        return DiceFocalLoss(class_weights, ignore_index=ignore_index)
    if name == "dice":
        return DiceLoss(class_weights, ignore_index=ignore_index)
    if name == "focal":
        return FocalLoss(class_weights, ignore_index=ignore_index)
    if name == "ce":
        return FocalLoss(class_weights, gamma=0.0, ignore_index=ignore_index)
    raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


class HierarchicalLoss(_Sum):
    """``head_weights[0] * binary + head_weights[1] * coarse + head_weights[2] * fine`` (0.2, 0.3, 0.5).

    Each head uses the loss ``name``; the binary and coarse targets come from ``hierarchy_targets`` over the
    label ``scheme``'s groups (its tables are buffers, so they move with the module). ``class_weights`` (one per
    fine class) apply to the fine head only; the binary and coarse heads are unweighted, since fine weights have
    no single meaning for a merged group.
    """

    def __init__(self, name, scheme, class_weights=None, head_weights=(0.2, 0.3, 0.5)):
        ignore = scheme.ignore
        super().__init__({"binary": build_loss(name, None, ignore), "coarse": build_loss(name, None, ignore),
                          "fine": build_loss(name, class_weights, ignore)}, tuple(head_weights))
        self.head_weights = tuple(head_weights)
        coarse, binary = label_tables(scheme)
        self.register_buffer("coarse_table", coarse, persistent=False)
        self.register_buffer("binary_table", binary, persistent=False)

    def parts(self, outputs, target):
        targets = hierarchy_targets(target, (self.coarse_table, self.binary_table))
        return {head: (None if outputs is None else outputs[head], targets[head]) for head in self.names}


def sum_over_ranks(sums, reduce=True):
    """The sums (detached) added over all ranks, in one collective (none with reduce=False: a local probe)."""
    keys = sorted(sums)
    flat = torch.cat([sums[k].detach().float().reshape(-1) for k in keys])
    if reduce:
        all_reduce(flat)
    out, start = {}, 0
    for k in keys:
        n = sums[k].numel()
        out[k] = flat[start:start + n].view_as(sums[k])
        start += n
    return out


def global_loss(loss, local, total):
    """The loss of the whole global batch, whose gradient flows into this rank's (micro-)batch only.

    local are this (micro-)batch's sums, with gradients; total the sums of the whole global batch over every
    rank and micro-batch, without. Putting the local part back into the total, ``total - local.detach() +
    local``, gives the global loss as value and, summed over micro-batches and ranks, exactly its gradient:
    one GPU and eight, one micro-batch and four, train the same objective. Keys missing from total (a linear
    loss's numerator) stay local.
    """
    return loss.from_sums({k: total[k] - v.detach() + v if k in total else v for k, v in local.items()})
