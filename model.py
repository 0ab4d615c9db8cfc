"""Segmentation networks: a timm encoder (features_only) under a hand-written UNet or UPerNet decoder with
either one fine head or binary/coarse/fine heads, plus loading encoder weights from local files or the hub."""
import collections
import math
import re
import sys
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from depthwise import use_depthwise
from encoders import ENCODERS
from hub import loaded, weights_file
from labels import UserError
from patchify import use_patch_product

DECODER_CHANNELS = (256, 128, 64, 32, 16)
UPERNET_CHANNELS = 256
MIT_HUB = "smp-hub/{}.imagenet"  # SegFormer's ImageNet MiT weights, SegFormer key names, model.safetensors
# Top-level parts of a whole classification or segmentation model that an encoder has no place for.
CLASSIFIER_PARTS = {"head", "fc", "classifier", "norm", "fc_norm", "pre_logits", "global_pool", "decoder",
                    "decode_head", "auxiliary_head", "segmentation_head"}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(precision, device):
    """Autocast context for --precision bf16 / fp16; fp32 runs without one."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def _spec(encoder):
    if encoder in ENCODERS:
        return ENCODERS[encoder]
    if timm.is_model(encoder):
        return dict(timm=encoder, kwargs={}, batch=32, needs_img_size=False, nhwc=False)
    raise UserError(f"--encoder {encoder}: unknown; use one of {', '.join(ENCODERS)} or a timm model name")


def default_batch(encoder):
    return _spec(encoder)["batch"]


def _nearest(size, multiple):
    return max(multiple, int(size / multiple + 0.5) * multiple)


def check_img_size(encoder, img_size):
    """--img-size must be a multiple of the deepest stride, 32 for every named encoder (MaxViT derives its
    window from img_size, so each multiple of 32 builds; the built model's input_multiple is stricter)."""
    _spec(encoder)
    multiple = 32
    if img_size < multiple or img_size % multiple:
        raise UserError(f"--img-size {img_size}: {encoder} needs a multiple of {multiple}; "
                        f"nearest valid size is {_nearest(img_size, multiple)}")


def _first_line(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _create_encoder(encoder, spec, img_size, pretrained, drop_path=0.0):
    kwargs = dict(spec["kwargs"], features_only=True)
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if pretrained:
        # Fetched (or found in the cache) before timm builds, so an offline node fails at once, in one line.
        source = timm.models.get_pretrained_cfg(spec["timm"])
        hub_id = source.hf_hub_id if source is not None else None
        if not hub_id:
            raise UserError(f"--pretrained: timm has no Hugging Face hub weights for {encoder} ({spec['timm']}); "
                            "pass --weights FILE or drop --pretrained")
        path = weights_file(hub_id, f"ImageNet weights for {encoder} ({hub_id})")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    try:
        if spec["needs_img_size"]:
            built = timm.create_model(spec["timm"], img_size=img_size, **kwargs)
        elif encoder not in ENCODERS:
            try:  # transformers among other timm names need the crop size at build time
                built = timm.create_model(spec["timm"], img_size=img_size, **kwargs)
            except TypeError:  # most CNNs take no img_size and accept any size
                built = timm.create_model(spec["timm"], **kwargs)
        else:
            built = timm.create_model(spec["timm"], **kwargs)
    except Exception as err:
        if drop_path and "drop_path_rate" in str(err):
            raise UserError(f"--drop-path {drop_path}: timm's {spec['timm']} has no stochastic depth "
                            "(drop_path_rate); use --drop-path 0 for this encoder") from err
        if pretrained:
            raise UserError(f"--pretrained: the ImageNet weights for {encoder} do not load ({_first_line(err)}); "
                            "pass --weights FILE or drop --pretrained") from err
        if encoder in ENCODERS:
            raise
        raise UserError(f"--encoder {encoder}: timm cannot build it with features_only ({_first_line(err)}); "
                        f"use one of {', '.join(ENCODERS)}") from err
    if pretrained:
        loaded(f"{encoder} ({spec['timm']})", path, len(built.state_dict()))
    return built


def _norm(norm, channels):
    return nn.BatchNorm2d(channels) if norm == "bn" else nn.GroupNorm(min(32, channels // 8), channels)


def _conv_norm_relu(cin, cout, kernel, norm):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), _norm(norm, cout),
                         nn.ReLU(inplace=True))


def _resize(x, size, mode="bilinear"):
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False if mode == "bilinear" else None)


class UNetDecoder(nn.Module):
    """smp's Unet decoder layout: from the deepest feature, upsample, concatenate the next shallower feature,
    two 3x3 conv-norm-ReLU; stages below the shallowest feature (stride 2 of a stride-4 pyramid, then stride 1)
    run without a skip, so the output is at input resolution."""

    def __init__(self, channels, reductions, norm, decoder_channels=DECODER_CHANNELS):
        super().__init__()
        skip_channels = list(channels[-2::-1])
        self.extra_strides = [reductions[0] >> k for k in range(1, int(math.log2(reductions[0])) + 1)]
        skip_channels += [0] * len(self.extra_strides)
        outs = [decoder_channels[min(i, len(decoder_channels) - 1)] for i in range(len(skip_channels))]
        ins = [channels[-1]] + outs[:-1]
        self.blocks = nn.ModuleList(
            nn.Sequential(_conv_norm_relu(cin + skip, cout, 3, norm), _conv_norm_relu(cout, cout, 3, norm))
            for cin, skip, cout in zip(ins, skip_channels, outs))
        self.out_channels = outs[-1]

    def forward(self, features, size):
        x = features[-1]
        skips = features[-2::-1]
        targets = [skip.shape[-2:] for skip in skips]
        targets += [(-(-size[0] // s), -(-size[1] // s)) for s in self.extra_strides]
        for i, (block, target) in enumerate(zip(self.blocks, targets)):
            x = _resize(x, target, mode="nearest")
            if i < len(skips):
                x = torch.cat([x, skips[i]], dim=1)
            x = block(x)
        return x


class UPerNetDecoder(nn.Module):
    """UPerNet (Xiao et al. 2018): pyramid pooling on the deepest feature, FPN top-down fusion over the four
    deepest levels, all levels resized to the finest and fused; output at the finest level's stride.
    A stride-2 stem level (MaxViT, CoAtNet) is left out: fusing at stride 2 would cost four times the FLOPs
    of the usual stride-4 fusion."""

    def __init__(self, channels, norm, width=UPERNET_CHANNELS, scales=(1, 2, 3, 6)):
        super().__init__()
        channels = list(channels[-4:])
        self.levels = len(channels)
        # no norm in the pooled branches: a 1x1 pooled map at batch 1 gives BatchNorm one value per channel
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(channels[-1], width, 1), nn.ReLU(inplace=True))
            for s in scales)
        self.bottleneck = _conv_norm_relu(channels[-1] + len(scales) * width, width, 3, norm)
        self.laterals = nn.ModuleList(_conv_norm_relu(c, width, 1, norm) for c in channels[-2::-1])
        self.smooths = nn.ModuleList(_conv_norm_relu(width, width, 3, norm) for _ in channels[:-1])
        self.fuse = _conv_norm_relu(self.levels * width, width, 3, norm)
        self.out_channels = width

    def forward(self, features, size):
        features = features[-self.levels:]
        top = features[-1]
        pooled = [_resize(pool(top), top.shape[-2:]) for pool in self.pools]
        x = self.bottleneck(torch.cat([top, *pooled], dim=1))
        levels = [x]
        for feature, lateral, smooth in zip(features[-2::-1], self.laterals, self.smooths):
            x = lateral(feature) + _resize(x, feature.shape[-2:])
            levels.append(smooth(x))
        finest = levels[-1].shape[-2:]
        return self.fuse(torch.cat([_resize(level, finest) for level in levels], dim=1))


# How an encoder takes its input: whether its features come channels-last (nhwc), the multiple its input sides
# must be, and the one side it was built for (encoders of one input size only) or None.
InputRule = collections.namedtuple("InputRule", "nhwc multiple size")


class SegmentationModel(nn.Module):
    """Encoder -> decoder -> 1 or 3 heads; logits resized to the input resolution."""

    def __init__(self, encoder_name, encoder, decoder, heads, rule):
        super().__init__()
        self.encoder_name = encoder_name
        self.encoder = encoder
        self.decoder = decoder
        self.heads = heads
        self.nhwc, self.input_multiple, self.input_size = rule

    def check_input(self, height, width):
        if self.input_size is not None and (height, width) != (self.input_size, self.input_size):
            raise UserError(f"input {height}x{width}: --encoder {self.encoder_name} takes only the --img-size "
                            f"it was built with, {self.input_size}x{self.input_size}")
        if height % self.input_multiple or width % self.input_multiple:
            raise UserError(f"input {height}x{width}: --encoder {self.encoder_name} needs sides that are multiples "
                            f"of {self.input_multiple}; nearest valid is "
                            f"{_nearest(height, self.input_multiple)}x{_nearest(width, self.input_multiple)}")

    def encode(self, x):
        """The encoder's features, NCHW."""
        features = self.encoder(x)
        return [f.permute(0, 3, 1, 2) for f in features] if self.nhwc else features

    def decode(self, features, size):
        """Decoder and heads: logits at size, a tensor (one head) or a dict of them."""
        y = self.decoder(features, size)
        logits = {name: _resize(head(y), size) for name, head in self.heads.items()}
        return logits if len(logits) > 1 else logits["fine"]

    def forward(self, x):
        size = x.shape[-2:]
        self.check_input(*size)
        return self.decode(self.encode(x), size)


def build_model(encoder, num_classes, decoder="unet", heads="fine", pretrained=False, img_size=384,
                norm="bn", weights=None, num_groups=None, drop_path=0.0):
    """A fine head of num_classes outputs; with heads="hierarchical" also a coarse head of num_groups (the label
    scheme's groups) and a binary clean/damage head. Weights given as a local file take precedence over
    --pretrained (nothing is downloaded then). drop_path is the encoder's stochastic depth rate (timm's
    drop_path_rate), active in training mode only."""
    spec = _spec(encoder)
    check_img_size(encoder, img_size)
    for flag, value, choices in (("--decoder", decoder, ("unet", "upernet")),
                                 ("--heads", heads, ("fine", "hierarchical")), ("--norm", norm, ("bn", "gn"))):
        if value not in choices:
            raise UserError(f"{flag} {value}: use one of {', '.join(choices)}")
    if heads == "hierarchical" and not num_groups:
        raise UserError("--heads hierarchical: the label scheme has no coarse groups; give \"groups\" in its "
                        "classes.json or use --heads fine")
    from_hub = pretrained and weights is None
    mit = encoder in ENCODERS and encoder.startswith("mit_b")
    features = _create_encoder(encoder, spec, img_size, from_hub and not mit, drop_path)
    use_depthwise(features)  # the same convolutions and parameters, a faster CPU backward
    use_patch_product(features)  # the same again, kernel-equals-stride convolutions as one matrix product
    channels, reductions = features.feature_info.channels(), features.feature_info.reduction()
    if decoder == "unet":
        body = UNetDecoder(channels, reductions, norm)
    else:
        body = UPerNetDecoder(channels, norm)
    head_classes = {"fine": num_classes}
    if heads == "hierarchical":
        head_classes.update(coarse=num_groups, binary=2)
    kernel = 3 if decoder == "unet" and heads == "fine" else 1  # smp's UNet head is 3x3; the others 1x1
    head_modules = nn.ModuleDict({name: nn.Conv2d(body.out_channels, n, kernel, padding=kernel // 2)
                                  for name, n in head_classes.items()})
    rule = spec.get("input_rule", "stride")
    model = SegmentationModel(encoder, features, body, head_modules, InputRule(
        nhwc=spec["nhwc"] or getattr(features, "output_fmt", "NCHW") == "NHWC",
        multiple=img_size if rule == "tiles" else max(reductions), size=img_size if rule == "exact" else None))
    if weights is not None:
        load_encoder_weights(model, weights)
    elif from_hub and mit:
        _load_mit_from_hub(model, encoder)
    return model


def sync_batchnorm(model):
    """model with every BatchNorm as SyncBatchNorm, converted the timm way: timm's BatchNormAct2d (MaxViT,
    CoAtNet) becomes SyncBatchNormAct and keeps calling its activation, where torch's own converter drops it.
    Parameter and buffer names are unchanged."""
    return timm.layers.convert_sync_batchnorm(model)


def _load_mit_from_hub(model, encoder):
    from safetensors.torch import load_file
    repo = MIT_HUB.format(encoder)
    path = weights_file(repo, repo, "pass --weights FILE (a SegFormer MiT checkpoint)", ("model.safetensors",))
    _load_encoder_state(model, rename_mit_keys(load_file(path)), f"--pretrained ({path})")


def strip_wrapper_prefixes(state):
    """State dict without the key prefixes that DDP ("module.") and torch.compile ("_orig_mod.") add."""
    stripped = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _unwrap(checkpoint):
    """Plain encoder state dict from a training checkpoint, a DDP/compiled model or a whole segmentation model."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = strip_wrapper_prefixes(checkpoint)
    for prefix in ("encoder.", "backbone."):
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return state


_MIT_RULES = [
    (re.compile(r"^patch_embed1\."), lambda m: "patch_embed."),
    (re.compile(r"^patch_embed([234])\."), lambda m: f"stages_{int(m[1]) - 1}.downsample."),
    (re.compile(r"^block([1-4])\.(\d+)\."), lambda m: f"stages_{int(m[1]) - 1}.blocks.{m[2]}."),
    (re.compile(r"^norm([1-4])\."), lambda m: f"stages_{int(m[1]) - 1}.norm."),
    (re.compile(r"\.mlp\.dwconv\.dwconv\."), lambda m: ".mlp.dwconv."),
]
_MIT_KEY = re.compile(r"^(patch_embed[1-4]|block[1-4]\.\d+)\.")


def rename_mit_keys(state_dict):
    """SegFormer/smp MiT names -> timm PVTv2 features_only names; attention keys (q, kv, sr, norm, proj)
    are the same in both. The ImageNet classifier (head.*) is dropped."""
    renamed = {}
    for key, value in _unwrap(state_dict).items():
        if key.startswith("head."):
            continue
        for pattern, replace in _MIT_RULES:
            key = pattern.sub(replace, key)
        renamed[key] = value
    return renamed


def _load_encoder_state(model, state, source):
    target = model.encoder.state_dict()
    # features_only flattens timm's module path ("stages.0" -> "stages_0"): match both spellings
    by_canonical = {key.replace("_", "."): key for key in target}
    state = {by_canonical.get(key.replace("_", "."), key): value for key, value in state.items()}
    missing = [key for key in target if key not in state]
    reshaped = [key for key in target if key in state and state[key].shape != target[key].shape]
    if missing or reshaped:
        problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                    for keys, what in ((missing, "missing"), (reshaped, "with other shapes")) if keys]
        raise UserError(f"{source}: does not fit encoder {model.encoder_name}: {'; '.join(problems)}; "
                        f"pass a checkpoint of this encoder or pick the --encoder it was trained with")
    ignored = sorted(key for key in state if key not in target)
    # A classifier or final norm is expected to be left over; encoder blocks are not (a larger model's weights:
    # mit_b3 into mit_b2 fills every tensor of b2 and leaves b3's extra blocks over).
    foreign = [key for key in ignored if key.split(".")[0] not in CLASSIFIER_PARTS]
    if foreign:
        raise UserError(f"{source}: holds {len(foreign)} encoder tensors that {model.encoder_name} lacks (e.g. "
                        f"{', '.join(foreign[:3])}): weights of a larger model; pass weights of this encoder or pick "
                        "the --encoder they were trained with")
    model.encoder.load_state_dict({key: state[key] for key in target})
    print(f"loaded {len(target)} encoder tensors from {source}"
          + (f"; ignored {len(ignored)} others (e.g. {', '.join(ignored[:3])})" if ignored else ""), file=sys.stderr)


def load_encoder_weights(model, path):
    """Load a local .pth/.pt/.safetensors checkpoint into model.encoder; MiT checkpoints in SegFormer/smp
    naming are renamed, timm-named ones load as they are."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file; pass a local .pth, .pt or .safetensors checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            checkpoint = load_file(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"--weights {path}: cannot be read as a checkpoint ({_first_line(err)})") from err
    if not isinstance(checkpoint, dict):
        raise UserError(f"--weights {path}: holds a {type(checkpoint).__name__}, not a state dict")
    state = _unwrap(checkpoint)
    if any(_MIT_KEY.match(key) for key in state):
        state = rename_mit_keys(state)
    _load_encoder_state(model, state, f"--weights {path}")

