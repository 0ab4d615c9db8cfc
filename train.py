"""Train and evaluate a damage-segmentation model: DDP (torchrun or srun), AMP, dataset-level mIoU, resume.

    torchrun --nproc_per_node=2 train.py --encoder mit_b3 --data data/artefact --pretrained
    python train.py --eval-only --checkpoint runs/NAME/best.pt [--full-res]
    python train.py --summary runs/cv-mit_b3/fold*

`main` orchestrates; `train` -> `fit` (after `prepare_fit`) -> `fit_epoch` -> `train_one_epoch` runs one
epoch of step.py's `train_step`s; evaluation.py's `evaluate` scores a split; `test_selected` scores the selected
checkpoint once.
"""
import json
import os
import sys
import time
from pathlib import Path

from config import lr_line, parse_args, resolve_config

if __name__ == "__main__":
    # --help and flag mistakes answer before torch loads (seconds on a cold node); main() parses again.
    parse_args()

import torch

import data
from autobatch import find_batch_size
from checkpoint import load_checkpoint, save_model
from config import with_batch
from distributed import (MAX, PeerLost, Preemption, Run, all_reduce, as_peer_lost, broadcast_buffers,
                         broadcast_module, setup_distributed, teardown)
from evaluation import eval_only, evaluate, scores, test_full_res
from heap import keep_freed_memory
from labels import UserError, run_cli, scheme_summary
from logs import epoch_line, header_lines, peak_memory_mb, progress_line, schedule_lr
from metrics import confusion_record, summary
from runs import (interrupted_line, load_resume, log, logged_to, prepare_run_dir, restore, run_folder, save_epoch,
                  save_preempted, save_run_summary, save_test, tensorboard_writer, write_config, write_scalars)
from step import build_network, build_training, evaluated, train_step
from weights import METHODS, check_images, resolve_class_weights



def train_one_epoch(parts, pre, epoch, start, run, run_state):
    """Steps start = (step0, the loss carried over from step0's pre-empted part).. of one epoch; returns its
    loss sum (device tensor), the steps done, skipped steps and whether a pre-emption stopped it early.
    Non-finite losses raise at the logging points; with --skip-nonfinite, more than --max-skipped consecutive
    skipped steps (counted in run_state across epochs) raise."""
    cfg, rank, device = run.cfg, run.rank, run.device
    step0, carried_loss = start
    steps_per_epoch = len(pre) // cfg["batch_size"]
    loss_sum = torch.full((), carried_loss if rank == 0 else 0.0, device=device)
    first_bad = torch.tensor(-1, device=device)
    skipped, step, micro = 0, step0, []
    # Seconds spent on the data path (waiting for the gather, converting) vs stepping since the last progress
    # line, as torchvision's MetricLogger splits them; a line at least every PROGRESS_SECONDS on rank 0.
    timing = {"data": 0.0, "step": 0.0, "steps": 0, "logged": time.time(), "epoch_steps": steps_per_epoch}
    tick = time.time()
    for x, y in data.train_batches(pre, run, epoch, step0, run_state["class_weights"], run_state["device_rows"]):
        micro.append((x, y))
        if len(micro) < cfg["accum_steps"]:
            continue
        timing["data"] += time.time() - tick
        tick = time.time()
        loss = train_step(parts, micro, cfg, device)
        timing["step"] += time.time() - tick
        timing["steps"] += 1
        micro = []
        finite = torch.isfinite(loss)
        if cfg["skip_nonfinite"]:
            # train_step skipped on the loss summed over ranks; every rank must count the same skips.
            finite = torch.isfinite(all_reduce(loss.clone()))
            run_state["consecutive"] = 0 if finite else run_state["consecutive"] + 1
            if not finite:
                skipped += 1
                log(rank, f"  skipped a non-finite loss at epoch {epoch + 1} step {step + 1}")
            if run_state["consecutive"] > cfg["max_skipped"]:
                raise UserError(f"--skip-nonfinite: {run_state['consecutive']} consecutive steps had a non-finite "
                                f"loss (epoch {epoch + 1} step {step + 1}, --max-skipped {cfg['max_skipped']}); "
                                "lower --lr or use --precision fp32")
        first_bad = torch.where(~finite & (first_bad < 0), step, first_bad)
        loss_sum += torch.where(finite, loss, 0.0)
        step += 1
        if step % cfg["log_every"] == 0 and step < steps_per_epoch:
            check_finite(first_bad, epoch, cfg)
        if rank == 0 and step < steps_per_epoch and (step % cfg["log_every"] == 0
                                                      or time.time() - timing["logged"] >= PROGRESS_SECONDS):
            progress_line(run, parts, epoch, step, loss_sum, timing)
        if run_state["preemption"].poll():
            return loss_sum, step, skipped, True
        tick = time.time()
    check_finite(first_bad, epoch, cfg)
    return loss_sum, step, skipped, False


PROGRESS_SECONDS = 30


def check_finite(first_bad, epoch, cfg):
    """Reads the device-side non-finite marker only at logging points, so the step itself never syncs."""
    if cfg["skip_nonfinite"]:
        return
    bad = int(all_reduce(first_bad.clone(), MAX).item())
    if bad >= 0:
        kept = (f"last good checkpoint kept in {cfg['run_dir']}" if (Path(cfg["run_dir"]) / "last.pt").is_file()
                else "no checkpoint was written yet")
        raise UserError(f"non-finite loss at epoch {epoch + 1} step {bad + 1}; {kept}; lower --lr, use "
                        "--precision fp32, or pass --skip-nonfinite")


def fit_epoch(parts, split, epoch, start, run, run_state):
    """Trains one epoch from start = (step, carried loss) and scores the inner validation part; returns its
    record, or None after writing last.pt when a pre-emption stopped it."""
    cfg, world, device = run.cfg, run.world, run.device
    steps_per_epoch = len(split["train"].pre) // cfg["batch_size"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.time()
    loss_sum, step, skipped, preempted = train_one_epoch(parts, split["train"].pre, epoch, start, run, run_state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.time() - began
    # Each rank's last forward updated its own BatchNorm statistics (and its EMA's average of them); rank 0's
    # are evaluated and saved.
    broadcast_buffers(parts.raw_model)
    if parts.ema is not None:
        broadcast_buffers(parts.ema.model)
    cms = None
    if not preempted and split["val"].samples:
        cms = evaluate(evaluated(parts), split["val"], run, run_state["preemption"])
        preempted = cms is None
    loss = float(all_reduce(loss_sum.clone())) / world
    if preempted:
        save_preempted(parts, run, epoch, step, run_state["best"], loss * world)
        return None
    record = {"epoch": epoch + 1, "train_loss": loss / max(steps_per_epoch, 1),
              "img_s": (step - start[0]) * cfg["batch_size"] / train_time, "epoch_time_s": time.time() - began,
              "peak_mem_mb": peak_memory_mb(device), "lr": schedule_lr(parts.optimizer), "skipped_steps": skipped}
    if cms is not None:
        record["val"] = scores(cms, cfg)
    return record


def test_selected(parts, split, run, preemption):
    """Scores the selected checkpoint (best.pt) once on the test fold; None when a pre-emption came first."""
    cfg, rank = run.cfg, run.rank
    run_dir = Path(cfg["run_dir"])
    selected = load_checkpoint(run_dir / "best.pt") if rank == 0 else None
    if selected is not None:
        evaluated(parts).load_state_dict(selected["model" if parts.ema is None else "ema"])
    broadcast_module(evaluated(parts))
    epoch = torch.tensor(selected["epoch"] if selected else 0)
    cms = evaluate(evaluated(parts), split["test"], run, preemption, per_image=True)
    if cms is None:
        log(rank, f"SIGTERM during the test evaluation; rerun with --resume to score {run_dir / 'best.pt'}")
        return None
    per_image = cms.pop("per_image")
    record = {"test": scores(cms, cfg), "selected_epoch": int(all_reduce(epoch, MAX)),
              "select": cfg["select"]}
    if rank == 0:
        save_test(run_dir, record, confusion_record(cms), [s.id for s in split["test"].samples], per_image)
    if cfg["full_res"]:
        test_full_res(evaluated(parts), split["test"], run, record["selected_epoch"])
    return record


def train(run):
    cfg, rank, world = run.cfg, run.rank, run.world
    run_dir = Path(cfg["run_dir"])
    torch.manual_seed(cfg["seed"])
    with run_folder(run_dir, rank):
        # The dataset files' fingerprint joins the config, so --resume refuses a dataset changed under its path.
        cfg["data_fingerprint"] = data.dataset_fingerprint(cfg, rank, run.local_rank)
        resume = load_resume(cfg, run_dir, rank)
        if resume and cfg["batch_auto"]:
            cfg.update(with_batch(cfg, resume["config"]["batch_size"], world))
        prepare_run_dir(cfg, run_dir, resume, rank)
        with logged_to(run_dir / "train.log", rank):
            result = fit(run, resume)
            if result is not None and rank == 0:
                # The selected model, small, for predict.py and for handing over (README "Damage maps").
                save_model(load_checkpoint(run_dir / "best.pt"), run_dir / "best.pt", run_dir / "model.pt",
                           (data.MEAN, data.STD))
            if result is not None and rank == 0 and not cfg["no_report"]:
                write_report(run_dir)
    return result


def write_report(run_dir):
    """The pictures and report.md; a failure there costs the finished run nothing."""
    from report import build_report
    try:
        print(f"report: {build_report([run_dir])}", flush=True)
    except UserError as exc:
        print(f"note: no report ({exc}); the run itself is complete", file=sys.stderr, flush=True)


def prepare_fit(run, resume):
    """Everything the epochs need, fresh or from --resume's checkpoint: (parts, split, start = (epoch, step,
    carried loss), run_state). Prints the run's header on rank 0."""
    cfg, rank, world, device = run.cfg, run.rank, run.world, run.device
    run_dir = Path(cfg["run_dir"])
    scheme = data.run_scheme(cfg)
    log(rank, f"label scheme: {scheme_summary(scheme)} ({cfg['classes_source']})")
    # The network comes first: a --pretrained download that cannot happen fails before minutes of preloading.
    network = build_network(cfg, device, world, cfg["pretrained"] and not resume, cfg["weights"])
    split = data.load_split(cfg, run.local_rank, run.local_world)
    n_train = len(split["train"].pre)
    if cfg["batch_auto"] and not resume and device.type == "cuda":
        cfg.update(with_batch(cfg, find_batch_size(probe_step(cfg, device), device, n_train // world, world),
                              world))
        if rank == 0:
            write_config(cfg, run_dir)
        log(rank, f"--batch-size auto: {cfg['batch_size']} fits ({lr_line(cfg)[0]})")
    if n_train < cfg["batch_size"]:
        raise UserError(f"--batch-size {cfg['batch_size']}: larger than the {n_train} training images; lower it")
    # The preload counted every row's class pixels (at the working scale) while building.
    counts = split["train"].pre.counts[:, :scheme.num_classes].sum(0)
    class_weights = resolve_class_weights(cfg["class_weights"], counts, scheme, cfg["max_ratio"],
                                          run_dir / "class_weights.json" if rank == 0 else None)
    note = check_images(cfg["class_weights"], cfg) if cfg["class_weights"] not in METHODS else None
    if note and rank == 0:
        print(note, file=sys.stderr, flush=True)
    # Once the data is loaded: what the heap keeps from here on is the steps' memory, reused every step.
    keep_freed_memory(device)
    parts = build_training(cfg, network, world, device, n_train // cfg["batch_size"], class_weights)
    # best: (inner mIoU, epoch) of the selected checkpoint, best.pt.
    start_epoch, start_step, best, carried = (restore(parts, resume, run_dir, rank) if resume
                                              else (0, 0, (-1.0, None), 0.0))
    if rank == 0:
        sizes = n_train, len(split["val"].samples), len(split["test"].samples)
        print("\n".join(header_lines(cfg, parts, sizes, device, world)), flush=True)
    # Run state the epochs share: the selection so far, consecutive skipped steps, the weights that pick
    # rare-damage crops and the training rows on the device (--device-data); fit adds the SIGTERM watcher.
    rows = data.rows_on_device(split["train"].pre, device) if cfg["device_data"] else None
    run_state = {"best": best, "consecutive": 0, "class_weights": class_weights, "device_rows": rows}
    return parts, split, (start_epoch, start_step, carried), run_state


def fit(run, resume):
    """Trains, selects and tests; returns the test record, or None when a pre-emption stopped it."""
    parts, split, (start_epoch, start_step, carried), run_state = prepare_fit(run, resume)
    cfg, rank, run_dir = run.cfg, run.rank, Path(run.cfg["run_dir"])
    preemption, run_start = Preemption(), time.time()
    run_state["preemption"] = preemption
    writer = tensorboard_writer(cfg, run_dir, rank, start_epoch)
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            start = (start_step, carried) if epoch == start_epoch else (0, 0.0)
            record = fit_epoch(parts, split, epoch, start, run, run_state)
            if record is None:
                return None
            best, last = run_state["best"], epoch + 1 == cfg["epochs"]
            if (record["val"]["miou"] > best[0] if cfg["select"] == "inner" else last):
                run_state["best"] = best = (record["val"]["miou"] if "val" in record else best[0], record["epoch"])
            record["best_val_miou"] = best[0]
            if rank == 0:
                save_epoch(parts, cfg, record, best, run_dir)
                write_scalars(writer, record)
                eta = (time.time() - run_start) / (epoch + 1 - start_epoch) * (cfg["epochs"] - epoch - 1)
                print(epoch_line(cfg, record, eta), flush=True)
        test_start = time.time()
        result = test_selected(parts, split, run, preemption)
        if result is not None:
            write_scalars(writer, result)
    finally:
        preemption.close()
        if writer is not None:
            writer.close()
    if result is not None:
        if rank == 0:
            save_run_summary(run_dir, parts.raw_model, cfg, run.world, time.time() - test_start)
        log(rank, f"test mIoU {result['test']['miou']:.4f} damage IoU {result['test'].get('binary_iou') or 0:.4f} "
                  f"(epoch {result['selected_epoch']}, --select {cfg['select']}); run folder {run_dir}")
    return result


def probe_step(cfg, device):
    """step(batch) for --batch-size auto: one training step at that per-rank batch, as training runs it
    (precision, channels_last, loss, AdamW states), on a separate local copy of the network: no DDP, no
    SyncBatchNorm, no loss sums over ranks, so a probe that runs out of memory on one rank leaves no
    collective unpaired on another. The global random state is left as it was."""
    probe = dict(cfg, compile=False, accum_steps=1, skip_nonfinite=False, clip=None, epochs=1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        parts = build_training(probe, build_network(probe, device, 1), 1, device, 10**6)
    size = cfg["img_size"]

    def step(batch):
        x = torch.randn(batch, 3, size, size, device=device)
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, cfg["num_classes"], (batch, size, size), device=device)
        try:
            train_step(parts, [(x, y)], probe, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            parts.optimizer.zero_grad(set_to_none=True)
    return step


def use_threads(args):
    """Applies --threads; returns the CPU threads torch will use, which the run config records."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def set_backends(cfg, device):
    """cuDNN autotuning, and TF32 for the float32 parts of a bf16/fp16 run; --precision fp32 stays strict
    float32. Set before anything runs on the GPU (the --batch-size auto probes included)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["precision"] != "fp32"


def setup(args):
    """The Run (config, device, ranks) with the process group up."""
    rank, world, local_rank, local_world, device = setup_distributed(args.dist_timeout, args.dist_backend)
    cfg = resolve_config(args, world, device)
    cfg["threads"] = use_threads(args)
    set_backends(cfg, device)
    if cfg["batch_auto"] and device.type != "cuda":
        log(rank, f"--batch-size auto: no GPU to fill; using {cfg['encoder']}'s default batch {cfg['batch_size']}")
    if not cfg["eval_only"]:
        line, warning = lr_line(cfg)
        log(rank, line)
        if warning and rank == 0:
            print(warning, file=sys.stderr, flush=True)
    return Run(cfg, device, rank, world, local_rank, local_world)


def run_main(args, job):
    """Runs job(run) on setup's Run; a user error ends in one line, exit 2."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    cfg = None
    try:
        run = setup(args)
        cfg, rank = run.cfg, run.rank
        job(run)
        return 0
    except KeyboardInterrupt:
        if rank == 0:
            print(interrupted_line(cfg), file=sys.stderr, flush=True)
        return 130
    except UserError as exc:
        print(f"error: {exc}" if rank == 0 else f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: out of device memory at --batch-size {args.batch_size or 'default'}; lower --batch-size, "
              "pass --micro-batch to accumulate, or use --batch-size auto (finished epochs are in last.pt)",
              file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:  # PeerLost, or a collective of DDP's own (as_peer_lost); anything else goes on
        lost = exc if isinstance(exc, PeerLost) else as_peer_lost(exc)
        if lost is None:
            raise
        kept = ("" if cfg is None or cfg["eval_only"]
                else f"; finished epochs are in {Path(cfg['run_dir']) / 'last.pt'}, rerun with --resume")
        print(f"error (rank {rank}): {lost}{kept}", file=sys.stderr, flush=True)
        return 1
    finally:
        teardown()


def dry_run(args):
    """Prints the config a run with these flags would use, without data or process group."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    cfg = dict(resolve_config(args, world, device), threads=use_threads(args))
    for line in () if cfg["eval_only"] else lr_line(cfg):
        if line:
            print(line, file=sys.stderr, flush=True)
    print(json.dumps(cfg, indent=2))


def main(argv=None):
    args = parse_args(argv)
    if args.summary:
        return run_cli(summary, args.summary)
    if args.dry_run:
        return run_cli(dry_run, args)
    return run_main(args, eval_only if args.eval_only else train)


if __name__ == "__main__":
    sys.exit(main())
