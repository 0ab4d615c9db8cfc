"""Flags -> run config: the one argparse (train.py and bench.py share it), every flag checked in one line,
and what follows from the flags: global, per-rank and micro-batch sizes, the scaled LR, the precision."""
import argparse
import math
import re
from pathlib import Path

from encoders import ENCODERS
from labels import HelpFormatter, UserError, scheme_to_dict

# --class-weights methods (weights.py holds their formulas and imports the names from here, as losses' names
# live in --loss's choices).
METHODS = ("inverse", "inverse_sqrt", "inverse_sqrt_log_scaled", "median_frequency", "effective_number", "none")

# torch and timm are imported inside the functions that need them: `--help` and flag mistakes answer in a
# fraction of a second instead of waiting seconds for them.
BASE_BATCH = 96
# Scaled LRs outside this range rarely train: below, the weights barely move; above, AdamW diverges.
LR_SANE = (1e-5, 1e-1)


def build_parser():
    """train.py's flags in their groups; bench.py adds its own group to the same parser."""
    p = argparse.ArgumentParser(description="Train and evaluate a damage-segmentation model: DDP (torchrun or srun), "
                                "AMP, dataset-level mIoU, k-fold splits, resume.", formatter_class=HelpFormatter)
    _data_flags(p.add_argument_group("data"))
    _model_flags(p.add_argument_group("model"))
    _optimisation_flags(p.add_argument_group("optimisation"))
    _evaluation_flags(p.add_argument_group("evaluation"))
    _run_flags(p.add_argument_group("distributed"), p.add_argument_group("output"))
    return p


def _data_flags(d):
    d.add_argument("--data", default=None, help="dataset folder (images/ + annotations/) or 'synthetic' (default: "
                   "synthetic; --eval-only: the checkpoint's)")
    d.add_argument("--classes", dest="classes_file", default=None, metavar="FILE", help="label scheme JSON (class "
                   "ids, names, colours, clean and ignore ids, coarse groups) (default: DATA/classes.json, else "
                   "ARTeFACT's 16 classes with a note; --eval-only: the checkpoint's)")
    d.add_argument("--synthetic-count", type=int, default=64, help="images in the generated synthetic set")
    d.add_argument("--synthetic-size", type=int, default=256, help="side of each synthetic image (px)")
    d.add_argument("--img-size", type=int, default=384, help="side of the square training crops and of the "
                   "evaluation/prediction tiles (px, a multiple of 32)")
    d.add_argument("--work-size", type=int, default=1024, help="long side (px) each image is resized to once, "
                   "keeping its aspect ratio; training crops and tiled evaluation work at this scale; 0 squashes "
                   "each whole image to --img-size instead (the earlier prototype's mode)")
    d.add_argument("--rare-crops", type=float, default=0.5, help="share (0-1) of training crops centred on a pixel "
                   "of a damage class in the image (rarer classes more often)")
    d.add_argument("--split", default="kfold", choices=["single", "kfold", "material", "content"],
                   help="how images are split (by source image; material/content leave one group out)")
    d.add_argument("--fold", type=int, default=0, help="which fold (or left-out group) is the test set")
    d.add_argument("--folds", type=int, default=3, help="number of folds for --split kfold")
    d.add_argument("--inner-frac", type=float, default=0.15, help="share (0-1) of a fold's training images held "
                   "out to select the checkpoint")
    d.add_argument("--splits", default=None, help="split manifest JSON to use or create (default: "
                   "<run-dir parent>/splits/<dataset>-...json, shared by the folds)")
    d.add_argument("--offline-aug", action="store_true", help="add flipped/rotated copies of the training images")
    d.add_argument("--preload", default="all", choices=["all", "val", "none"],
                   help="which splits are decoded once into shared memory per node (none: decode every batch)")
    d.add_argument("--device-data", action="store_true", help="keep the preloaded training images on the GPU and "
                   "cut, flip and augment the crops there (default: cut on the host, one copy per batch)")
    d.add_argument("--scale-aug", default=None, metavar="LO,HI", help="random scale of each training crop, drawn "
                   "log-uniformly from LO..HI (e.g. 0.5,2.0; 0.25 <= LO <= HI <= 4): a window of side --img-size / "
                   "scale at the working scale, resized to --img-size (default: off, scale 1)")
    d.add_argument("--colour-aug", type=float, default=0.0, help="photometric distortion strength J (0-1): "
                   "brightness, contrast and saturation factors from 1-J..1+J, hue shift up to J/4 of a turn "
                   "(0.4 is torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1); default 0: off)")
    d.add_argument("--blur-aug", type=float, default=0.0, help="share (0-1) of training crops blurred with a "
                   "Gaussian of sigma 0.1-2.0 working-scale pixels (default 0: off)")


def _model_flags(m):
    m.add_argument("--encoder", default="mit_b3", help=f"one of {', '.join(ENCODERS)} or any timm model name")
    m.add_argument("--decoder", default="unet", choices=["unet", "upernet"], help="decoder over the encoder's maps")
    m.add_argument("--heads", default="fine", choices=["fine", "hierarchical"],
                   help="one head over the label scheme's classes, or binary + coarse + fine heads (the scheme's "
                   "groups)")
    m.add_argument("--head-weights", default="0.2,0.3,0.5", help="binary,coarse,fine loss weights (hierarchical)")
    m.add_argument("--norm", default="bn", choices=["bn", "gn"], help="decoder norm; gn is batch-independent")
    m.add_argument("--pretrained", action="store_true", help="ImageNet encoder weights from the Hugging Face hub")
    m.add_argument("--weights", default=None, help="local encoder weights file (default: none; random or "
                   "--pretrained)")
    m.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype; auto is bf16 on GPUs with bf16 tensor cores (Ampere and newer), fp16 with a "
                        "GradScaler on older GPUs (V100, T4), fp32 on CPU; fp32 is strict float32 (no TF32)")
    m.add_argument("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    m.add_argument("--no-channels-last", action="store_true", help="keep NCHW tensors instead of channels_last")


def _optimisation_flags(o):
    o.add_argument("--epochs", type=int, default=50, help="passes over the training images (epochs)")
    o.add_argument("--batch-size", default=None, help="global batch over all ranks (images) or 'auto' (the largest "
                   "per-GPU batch whose training step fits, the same on every rank, at most the training images) "
                   "(default: per encoder, e.g. mit_b3 32, convnext_tiny 96)")
    o.add_argument("--micro-batch", type=int, default=None, help="images per rank per forward; gradients of the "
                   "rest are accumulated (default: the whole per-rank batch)")
    o.add_argument("--lr", type=float, default=1e-3, help=f"base peak LR at global batch {BASE_BATCH}; the run "
                   f"uses lr x batch / {BASE_BATCH}")
    o.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    o.add_argument("--pct-start", type=float, default=0.3, help="share (0-1) of the steps spent warming up "
                   "(OneCycle)")
    o.add_argument("--no-decay-norms", action="store_true", help="no weight decay on norms, biases and position "
                   "tables, only on weight matrices and kernels (the timm/SegFormer recipe; default: decay on all)")
    o.add_argument("--head-lr-mult", type=float, default=1.0, help="LR multiplier of the decoder and heads over "
                   "the encoder's (SegFormer's recipe: 10)")
    o.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise LR decay (0-1]: each encoder stage "
                   "trains at this times the LR of the one above it, the deepest at this times the decoder's")
    o.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the timm encoder "
                   "(drop_path_rate; SegFormer's MiT recipe: 0.1)")
    o.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights; it is "
                   "what is evaluated, selected, tested and saved for --eval-only and predict.py")
    o.add_argument("--ema-half-life", type=float, default=0.1, help="with --ema: half-life of the average as a "
                   "share (0-1] of the run's optimizer steps")
    o.add_argument("--loss", default="dicefocal", choices=["dicefocal", "dice", "focal", "ce"], help="loss function")
    o.add_argument("--class-weights", default="inverse_sqrt_log_scaled", help=f"{'|'.join(METHODS)} or a JSON "
                   "file from weights.py")
    o.add_argument("--max-ratio", type=float, default=36.0, help="cap on the largest/smallest class weight "
                   "(inf: no cap)")
    o.add_argument("--clip", type=float, default=None, help="gradient clipping max-norm (default: no clipping)")
    o.add_argument("--seed", type=int, default=42, help="seed of the splits, crops and initialisation")
    o.add_argument("--skip-nonfinite", action="store_true", help="skip steps with a non-finite loss (syncs)")
    o.add_argument("--max-skipped", type=int, default=20,
                   help="with --skip-nonfinite: stop after this many consecutive skipped steps")


def _evaluation_flags(e):
    e.add_argument("--select", default="inner", choices=["inner", "last"],
                   help="checkpoint scored on the test fold: best epoch on an inner validation split carved from the "
                        "training images, or the last epoch (a fixed schedule; no inner split)")
    e.add_argument("--eval-only", action="store_true", help="score --checkpoint on a split, no training")
    e.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only or --resume (default: "
                   "RUN_DIR/last.pt with --resume; --eval-only needs it)")
    e.add_argument("--eval-split", default="test", choices=["test", "val"],
                   help="with --eval-only: the fold's test part, or its inner validation part")
    e.add_argument("--eval-tta", default="none", choices=["none", "flip"], help="test-time augmentation of every "
                   "evaluation (inner validation, test, --eval-only): flip averages the probabilities of the image "
                   "and its horizontal, vertical and double flips, as predict.py --tta (4x the inference)")
    e.add_argument("--full-res", action="store_true", help="score at the images' own resolution: with --eval-only "
                   "instead of the working scale; in training, the selected checkpoint also, after its test "
                   "(RUN_DIR/eval-test-fullres.json; slow on large images)")
    e.add_argument("--summary", nargs="+", default=None, metavar="RUN_DIR", help="print mean ± std of the test "
                   "metrics over finished folds and exit (default: off)")


def _run_flags(t, r):
    t.add_argument("--dist-timeout", type=int, default=600, help="seconds before a stuck collective fails")
    t.add_argument("--dist-backend", default="auto", help="process-group backend: auto (nccl on GPUs, gloo on CPU) or "
                   "a torch.distributed backend string, e.g. cuda:gloo to test several ranks on one GPU")
    t.add_argument("--threads", type=int, default=None, help="CPU threads per process for torch (default: "
                   "OMP_NUM_THREADS if set, else torch's choice; with several ranks on one CPU node, cores / ranks)")
    r.add_argument("--run-dir", default=None, help="folder for config, logs, metrics and checkpoints (default: "
                   "runs/<encoder>-<decoder>-<split><fold>)")
    r.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    r.add_argument("--log-every", type=int, default=20, help="progress line every N steps")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    r.add_argument("--no-report", action="store_true", help="skip the pictures and report.md at the end")
    r.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to "
                   "RUN_DIR/tensorboard (needs the tensorboard package)")


def lr_line(cfg):
    """(how the run's LR follows from the flags, a warning when it is outside LR_SANE or None)."""
    line = f"lr {cfg['lr']:.1e} = --lr {cfg['base_lr']:g} x batch {cfg['batch_size']} / {BASE_BATCH}"
    low, high = LR_SANE
    if cfg["lr"] < low:
        return line, f"warning: scaled lr {cfg['lr']:.1e} is below {low:g}: training will barely move; raise --lr"
    if cfg["lr"] > high:
        return line, f"warning: scaled lr {cfg['lr']:.1e} is above {high:g}: training may diverge; lower --lr"
    return line, None


def parse_args(argv=None, make_parser=build_parser):
    """The flags; given_flags lists those on the command line, so --eval-only can refuse an explicit --fold
    that is not the checkpoint's while the checkpoint's own values fill in the rest."""
    args = make_parser().parse_args(argv)
    args.given_flags = given_flags(argv, make_parser)
    return args


def given_flags(argv=None, make_parser=build_parser):
    """Sorted names (dests) of the flags on the command line: a parse in which no flag has a default."""
    parser = make_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return sorted(vars(parser.parse_args(argv)))


def _batch_sizes(args, world_size):
    """(global batch, per-rank batch, micro-batch) from --batch-size and --micro-batch; 'auto' stands for the
    encoder's default until the search (train.py, on a GPU) replaces it."""
    from model import default_batch
    if args.batch_size == "auto" and args.micro_batch:
        raise UserError(f"--micro-batch {args.micro_batch} with --batch-size auto: auto picks the largest per-GPU "
                        "batch that fits one forward and backward, so nothing is left to accumulate; give "
                        "--batch-size N to accumulate micro-batches, or drop --micro-batch")
    if args.batch_size in (None, "auto"):
        batch = default_batch(args.encoder)
    else:
        try:
            batch = int(args.batch_size)
        except ValueError:
            raise UserError(f"--batch-size {args.batch_size}: give a number or 'auto'") from None
    if batch < world_size or batch % world_size:
        raise UserError(f"--batch-size {batch}: must be a multiple of the {world_size} ranks; "
                        f"use {max(world_size, batch // world_size * world_size)}")
    per_rank = batch // world_size
    micro = args.micro_batch or per_rank
    if micro < 1 or per_rank % micro:
        raise UserError(f"--micro-batch {micro}: must divide the per-rank batch {per_rank}")
    return batch, per_rank, micro


def with_batch(cfg, batch, world_size):
    """The batch-derived fields of cfg for another global batch (what --batch-size auto found, or a resumed
    auto run's): per-rank batch, micro-batch (the whole per-rank batch) and the scaled LR."""
    if batch < world_size or batch % world_size:
        raise UserError(f"--batch-size {batch}: must be a multiple of the {world_size} ranks; "
                        f"use {max(world_size, batch // world_size * world_size)}")
    per_rank = batch // world_size
    return dict(batch_size=batch, per_rank_batch=per_rank, micro_batch=per_rank, accum_steps=1,
                lr=cfg["base_lr"] * batch / BASE_BATCH)


def auto_precision(device):
    """--precision auto: bf16 where the GPU has bf16 tensor cores (torch's plain is_bf16_supported() also
    counts emulation, True on a V100), fp16 with a GradScaler on older tensor-core GPUs, else fp32."""
    import torch
    if device.type != "cuda":
        return "fp32"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp16" if torch.cuda.get_device_capability(device)[0] >= 7 else "fp32"


def check_numbers(args):
    """Every numeric flag in its range, or one line naming the flag and what it takes."""
    def finite(x):
        return x is not None and math.isfinite(x)

    checks = [("--lr", args.lr, finite(args.lr) and args.lr > 0, "a positive number, e.g. 1e-3"),
              ("--weight-decay", args.weight_decay, finite(args.weight_decay) and args.weight_decay >= 0,
               "0 or more, e.g. 0.01"),
              ("--pct-start", args.pct_start, finite(args.pct_start) and 0 < args.pct_start < 1,
               "between 0 and 1, e.g. 0.3"),
              ("--clip", args.clip, args.clip is None or (finite(args.clip) and args.clip > 0),
               "a positive gradient max-norm, e.g. 1.0 (leave it out for no clipping)"),
              ("--max-ratio", args.max_ratio, args.max_ratio >= 1, "at least 1 (inf for no cap)"),
              ("--epochs", args.epochs, args.epochs >= 1, "at least 1"),
              ("--log-every", args.log_every, args.log_every >= 1, "at least 1 (steps)"),
              ("--seed", args.seed, 0 <= args.seed < 2**32, "between 0 and 2**32 - 1"),
              ("--synthetic-count", args.synthetic_count, args.synthetic_count >= 2, "at least 2 (images)"),
              ("--synthetic-size", args.synthetic_size, args.synthetic_size >= 32, "at least 32 (px)"),
              ("--micro-batch", args.micro_batch, args.micro_batch is None or args.micro_batch >= 1, "at least 1"),
              ("--dist-timeout", args.dist_timeout, args.dist_timeout >= 1, "at least 1 (seconds)"),
              ("--threads", args.threads, args.threads is None or args.threads >= 1, "at least 1 (threads)"),
              ("--max-skipped", args.max_skipped, args.max_skipped >= 1, "at least 1 (steps)"),
              ("--folds", args.folds, args.folds >= 2, "at least 2"),
              ("--fold", args.fold, args.fold >= 0, "0 or more"),
              ("--inner-frac", args.inner_frac, 0 < args.inner_frac < 1, "between 0 and 1, e.g. 0.15"),
              ("--work-size", args.work_size, args.work_size == 0 or args.work_size >= args.img_size,
               f"0 (squash to --img-size) or at least --img-size {args.img_size}"),
              ("--rare-crops", args.rare_crops, 0 <= args.rare_crops <= 1, "between 0 and 1, e.g. 0.5"),
              ("--colour-aug", args.colour_aug, finite(args.colour_aug) and 0 <= args.colour_aug <= 1,
               "between 0 and 1, e.g. 0.4 (0: off)"),
              ("--blur-aug", args.blur_aug, finite(args.blur_aug) and 0 <= args.blur_aug <= 1,
               "between 0 and 1, e.g. 0.2 (0: off)"),
              ("--head-lr-mult", args.head_lr_mult, finite(args.head_lr_mult) and args.head_lr_mult > 0,
               "a positive number, e.g. 10"),
              ("--layer-decay", args.layer_decay, 0 < args.layer_decay <= 1, "in (0, 1], e.g. 0.9 (1: none)"),
              ("--drop-path", args.drop_path, 0 <= args.drop_path < 1, "in [0, 1), e.g. 0.1"),
              ("--ema-half-life", args.ema_half_life, 0 < args.ema_half_life <= 1,
               "a share of the run's steps in (0, 1], e.g. 0.1")]
    for flag, value, ok, need in checks:
        if not ok:
            raise UserError(f"{flag} {value}: must be {need}")
    spec = args.class_weights
    if spec not in METHODS and not Path(spec).is_file():
        raise UserError(f"--class-weights {spec}: give a method ({', '.join(METHODS)}) or an existing .json file "
                        "from weights.py")
    if args.run_dir and Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise UserError(f"--run-dir {args.run_dir}: is a file; pass a folder for the run's checkpoints and logs")


def resolve_config(args, world_size, device):
    """Checks flags that need no data and derives batch, LR and precision; raises UserError naming the flag."""
    from model import check_img_size

    check_numbers(args)
    cfg = vars(args).copy()
    if args.data is not None and not args.data.strip():
        raise UserError(f"--data {args.data!r}: empty (an unset variable in a job script?); pass a dataset folder or "
                        "'synthetic'")
    cfg.update(data=args.data or "synthetic", data_flag=args.data)
    if args.data not in (None, "synthetic") and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: folder not found; run `python prepare.py ingest` or use --data synthetic")
    if args.encoder not in ENCODERS and not _timm_knows(args.encoder):
        raise UserError(f"--encoder {args.encoder}: unknown; use one of {', '.join(ENCODERS)} or a timm model name")
    check_img_size(args.encoder, args.img_size)
    cfg["head_weights"] = _head_weights(args.head_weights)
    cfg["scale_aug"] = _scale_range(args.scale_aug)
    # Evaluation trains nothing: its tiles go through the model --micro-batch (or the checkpoint's) at a time.
    batch, per_rank, micro = (None, None, args.micro_batch) if args.eval_only else _batch_sizes(args, world_size)
    if not 0 <= args.fold < max(args.folds, 1) and args.split == "kfold":
        raise UserError(f"--fold {args.fold}: must be in 0..{args.folds - 1} for --folds {args.folds}")
    if args.eval_only and not (args.checkpoint or args.run_dir):
        raise UserError("--eval-only: give --checkpoint PATH (e.g. runs/NAME/best.pt)")
    precision = auto_precision(device) if args.precision == "auto" else args.precision
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16: needs a GPU; use bf16 or fp32 on CPU")
    # A leave-one-group-out fold is named by the group it tests on (--eval-only takes the checkpoint's).
    from data import held_out
    group = None if args.eval_only else held_out(cfg)
    name = f"runs/{args.encoder}-{args.decoder}-{args.split}{args.fold}"
    if group:
        name += "-" + re.sub(r"[^\w.-]", "_", group.split("=", 1)[1])
    cfg.update(batch_size=batch, per_rank_batch=per_rank, micro_batch=micro,
               accum_steps=per_rank // micro if per_rank else None, lr=args.lr * batch / BASE_BATCH if batch else None,
               base_lr=args.lr, batch_auto=args.batch_size == "auto", precision=precision, world_size=world_size,
               channels_last=not args.no_channels_last, device=device.type, held_out=group,
               run_dir=args.run_dir or name)
    # --eval-only takes the label scheme with the checkpoint (evaluation.eval_only).
    if not args.eval_only:
        cfg.update(label_scheme(cfg["data"], args.classes_file, args.heads))
    return cfg


def _scale_range(text):
    """--scale-aug LO,HI -> [lo, hi], or None when not given."""
    if text is None:
        return None
    from augment import SCALE_LIMITS
    low, high = SCALE_LIMITS
    try:
        scale = [float(v) for v in text.split(",")]
    except ValueError:
        scale = []
    if len(scale) != 2 or not low <= scale[0] <= scale[1] <= high:
        raise UserError(f"--scale-aug {text}: give LO,HI with {low:g} <= LO <= HI <= {high:g}, e.g. 0.5,2.0")
    return scale


def label_scheme(data, classes_file, heads):
    """The run config's label scheme entries: classes (the scheme as a dict, so config.json and every checkpoint
    carry it), num_classes, classes_source; --heads hierarchical needs the scheme's coarse groups."""
    from data import data_scheme
    scheme, source = data_scheme(data, classes_file)
    if heads == "hierarchical" and scheme.groups is None:
        raise UserError(f"--heads hierarchical: the label scheme of {source} has no coarse groups; add \"groups\" "
                        "to it (README 'Your own dataset') or use --heads fine")
    return {"classes": scheme_to_dict(scheme), "num_classes": scheme.num_classes, "classes_source": source}


def _head_weights(text):
    """--head-weights as three loss weights, each finite and 0 or more, not all 0 (a negative weight would
    maximise its head's loss; all zero trains nothing)."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3:
        raise UserError(f"--head-weights {text}: give three numbers binary,coarse,fine e.g. 0.2,0.3,0.5")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights):
        raise UserError(f"--head-weights {text}: each weight must be 0 or more and at least one above 0 (a negative "
                        "one trains by ascending that head's loss), e.g. 0.2,0.3,0.5")
    return weights


def _timm_knows(name):
    import timm
    return name in timm.list_models() or name.split(".")[0] in timm.list_models()
