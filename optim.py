"""Optimisation: parameter groups (weight decay, decoder/head LR multiplier, layer-wise LR decay), AdamW, the
OneCycle schedule with each group's own peak LR, and the weight EMA.

A parameter's LR scale is --head-lr-mult for the decoder and heads, and --layer-decay ** (deepest + 1 - depth)
for an encoder parameter at a depth (0 the stem, 1.. its feature stages), so the deepest stage trains at
--layer-decay x the decoder's LR, as timm's param_groups_layer_decay scales a classifier's blocks. Groups with
the same LR scale and weight decay are merged: the defaults give today's single group.
"""
import collections
import copy

import torch

from labels import UserError

# Parameters kept out of weight decay besides the 1-d ones (norms, biases, layer scales): the position tables
# of timm's encoders' no_weight_decay() (Swin's absolute_pos_embed and relative_position_bias_table, MaxViT's and
# CoAtNet's rel_pos tables), which a features_only encoder no longer offers as a method.
NO_DECAY_NAMES = ("pos_embed", "relative_position_bias_table", "rel_pos.mlp", "cls_token")

# The averaged copy of the network and its per-step decay (see ema_decay).
EMA = collections.namedtuple("EMA", "model decay")


def encoder_depths(encoder):
    """{parameter name: depth} of a timm features_only encoder: 0 for the stem (parameters before the first
    feature stage), then 1, 2, ... for each feature stage that has parameters, in order; a parameter outside
    every stage after the first (a downsampling layer) belongs to the stage it feeds."""
    stages = [name.replace(".", "_") for name in encoder.feature_info.module_name()]
    names = [name for name, p in encoder.named_parameters() if p.requires_grad]
    stage_of = [next((i for i, s in enumerate(stages) if name == s or name.startswith(s + ".")), None)
                for name in names]
    if all(i is None for i in stage_of):
        raise UserError(f"--layer-decay: no parameter of the encoder lies in its feature stages ({', '.join(stages)}); "
                        "use --layer-decay 1 for this encoder")
    # Walking backwards, an unstaged parameter takes the stage after it; the stem's are those before any stage.
    first = next(k for k, stage in enumerate(stage_of) if stage is not None)
    depth, following = {}, max(i for i in stage_of if i is not None)
    for k in range(len(names) - 1, -1, -1):
        following = stage_of[k] if stage_of[k] is not None else following
        depth[names[k]] = following if k >= first else -1
    levels = sorted(set(depth.values()))
    return {name: levels.index(d) for name, d in depth.items()}


def decays(name, parameter, cfg):
    """Whether weight decay applies: everything by default; with --no-decay-norms not to 1-d parameters
    (norms, biases, layer scales) nor to position tables (NO_DECAY_NAMES)."""
    return not cfg["no_decay_norms"] or not (parameter.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES))


def param_groups(model, cfg):
    """AdamW parameter groups of a SegmentationModel: [{"params", "lr_scale", "weight_decay", "name"}], one per
    distinct (LR scale, weight decay), parameters in the model's order."""
    layered = cfg["layer_decay"] != 1
    depths = encoder_depths(model.encoder) if layered else {}
    deepest = max(depths.values(), default=0)
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("encoder."):
            depth = depths.get(name[len("encoder."):], deepest)
            scale = cfg["layer_decay"] ** (deepest + 1 - depth)
            part = f"encoder depth {depth}" if layered else "encoder"
        else:
            scale, part = cfg["head_lr_mult"], "decoder+heads"
        decay = cfg["weight_decay"] if decays(name, parameter, cfg) else 0.0
        group = groups.setdefault((scale, decay), {"params": [], "lr_scale": scale, "weight_decay": decay,
                                                   "name": []})
        group["params"].append(parameter)
        if part not in group["name"]:
            group["name"].append(part)
    return [dict(g, name=", ".join(g["name"])) for g in groups.values()]


def build_optimizer(model, cfg, device):
    """AdamW over param_groups(model, cfg). The fused step is one kernel per step on CPU as on CUDA: about half
    the optimizer time on CPU."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                             fused=device.type in ("cuda", "cpu"))


def one_cycle(optimizer, cfg, steps_per_epoch):
    """OneCycle (cosine) over the run, each group to its own peak lr x lr_scale: torch's OneCycleLR given one
    max_lr sets every group to it, ignoring any scale the group carries."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[cfg["lr"] * g["lr_scale"] for g in
                                                                  optimizer.param_groups],
                                               total_steps=cfg["epochs"] * steps_per_epoch,
                                               pct_start=cfg["pct_start"], anneal_strategy="cos")


def ema_decay(cfg, total_steps):
    """Per-step decay of the weight EMA: a half-life of --ema-half-life x the run's optimizer steps, so the
    average spans the same share of any run. timm's fixed 0.9998 has a half-life of ~3,500 steps; an
    ARTeFACT fold at the defaults trains ~350 (about 237 images, batch 32, 50 epochs), after which 93 % of
    such an average would still be the initial weights."""
    return 0.5 ** (1.0 / max(cfg["ema_half_life"] * total_steps, 1.0))


def new_ema(model, cfg, total_steps):
    """EMA of a copy of model (eval mode, no gradients) when --ema is given, else None."""
    if not cfg["ema"]:
        return None
    return EMA(copy.deepcopy(model).eval().requires_grad_(False), ema_decay(cfg, total_steps))


@torch.no_grad()
def update_ema(ema, model):
    """ema <- decay * ema + (1 - decay) * model for every floating-point parameter and buffer (BatchNorm's
    running statistics included), integer buffers copied. Every rank holds the same weights after a step, so
    the same update keeps their averages equal without a collective."""
    for averaged, current in zip(ema.model.state_dict().values(), model.state_dict().values()):
        if averaged.is_floating_point():
            averaged.lerp_(current, 1.0 - ema.decay)
        else:
            averaged.copy_(current)
