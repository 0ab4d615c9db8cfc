"""A grid of train.py flags -> its runs, one run folder per configuration and fold, trained one after another on
this machine and then compared (compare.py); --list prints the runs and runs nothing, and slurm/submit_bench.sh
submits the same runs as a chain of jobs.

    python grid.py --loss 'dice|dicefocal' --encoder 'resnet10t|mit_b0' --folds 2 --epochs 1 [--grid-dir DIR]
                   [--full-res] [--nproc N] [--list]

A flag whose value holds '|' is an axis of the grid (quote it for the shell); every other flag goes to each run as
it is. The folds are every fold of --split (--folds of kfold, one per group of material/content) or those --fold
names ('0|2' too). Run folders: GRID_DIR/<the axes' values joined by ->/fold<k>, plus -<group> for a
leave-one-group-out fold. A run with its test record is kept and one with last.pt resumes, so the same command
finishes an interrupted grid.
"""
import argparse
import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

from config import build_parser
from labels import GROUP_COLUMNS, HelpFormatter, UserError, run_cli

ROOT = Path(__file__).resolve().parent
# train.py flags the grid sets itself for every run.
GRID_OWN = ("--run-dir",)


def _slug(value):
    """A value as a folder-name part: a file's stem (e.g. a --class-weights JSON), unsafe characters as _."""
    text = Path(value).stem if "/" in value or value.endswith(".json") else value
    return re.sub(r"[^\w.=+-]", "_", text) or "_"


def split_axes(args):
    """[(flag, [values])] in the order given: one value for a plain flag (None for a switch), several for an axis."""
    items, k = [], 0
    while k < len(args):
        arg = args[k]
        if not arg.startswith("--"):
            raise UserError(f"grid: {arg!r}: expected a train.py flag (--name value); quote an axis, e.g. "
                            "--loss 'dice|dicefocal'")
        if "=" in arg:
            flag, value = arg.split("=", 1)
        elif k + 1 < len(args) and not args[k + 1].startswith("--"):
            flag, value = arg, args[k + 1]
            k += 1
        else:
            flag, value = arg, None
        k += 1
        if flag in GRID_OWN:
            raise UserError(f"grid: {flag}: the grid names each run's folder; choose where with --grid-dir")
        values = None if value is None else value.split("|")
        if values is not None and (not all(values) or len(set(values)) < len(values) or "\n" in value):
            raise UserError(f"grid: {flag} {value!r}: an axis needs distinct, non-empty values, e.g. 'dice|dicefocal'")
        items.append((flag, values))
    return items


def _tokens(items, choice):
    out = []
    for flag, values in items:
        out += [flag] if values is None else [flag, choice.get(flag, values[0])]
    return out


def _parsed(args):
    """train.py's parse of one configuration's arguments; a flag it does not know or a bad value is one line."""
    parser = build_parser()

    def error(message):
        raise UserError(f"grid: {message} (python train.py --help lists the flags)")
    parser.error = error
    parsed, unknown = parser.parse_known_args(args)
    if unknown:
        error(f"{' '.join(unknown)}: not a flag of train.py or grid.py")
    return parsed


def _folds(args):
    """[(fold, folder name)] of the split these arguments train on."""
    parsed = _parsed(args)
    if parsed.split in GROUP_COLUMNS:
        from data import resolve_data
        from splits import group_names
        names = group_names(resolve_data(parsed.data or "synthetic", parsed.synthetic_count, parsed.synthetic_size),
                            parsed.split)
        return [(k, f"fold{k}-{_slug(name)}") for k, name in enumerate(names)]
    return [(k, f"fold{k}") for k in range(parsed.folds if parsed.split == "kfold" else 1)]


def plan(train_args, grid_dir):
    """[(run folder, train.py arguments)] of the grid, configuration by configuration, fold by fold. Each
    configuration's arguments are checked by train.py's parser before anything runs."""
    items = split_axes(train_args)
    fold_values = [v for flag, v in items if flag == "--fold"]
    items = [(flag, v) for flag, v in items if flag != "--fold"]
    axes = [(flag, values) for flag, values in items if values is not None and len(values) > 1]
    runs, folders = [], {}
    for combination in itertools.product(*(values for _, values in axes)):
        choice = dict(zip((flag for flag, _ in axes), combination))
        args = _tokens(items, choice)
        name = "-".join(_slug(v) for v in combination)
        if folders.setdefault(name, combination) != combination:
            raise UserError(f"grid: {folders[name]} and {combination} would share the folder {grid_dir / name}; "
                            "give values that differ in letters or digits")
        folds = _folds(args)
        if fold_values:
            wanted = {int(v) for v in fold_values[-1]} if all(v.isdigit() for v in fold_values[-1]) else None
            if wanted is None or not wanted <= {k for k, _ in folds}:
                raise UserError(f"grid: --fold {'|'.join(fold_values[-1])}: this split has folds "
                                f"0..{len(folds) - 1}")
            folds = [(k, n) for k, n in folds if k in wanted]
        for fold, fold_name in folds:
            run_dir = grid_dir / name / fold_name if name else grid_dir / fold_name
            runs.append((run_dir, [*args, "--fold", str(fold), "--run-dir", str(run_dir)]))
    return runs


def _finished(run_dir):
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and any('"test":' in line for line in metrics.read_text().splitlines())


def run_grid(runs, full_res, nproc):
    """Trains each run in turn (train.py --full-res also scores the selected checkpoint at full resolution): a
    finished run is kept (and only scored at full resolution if that is asked and missing), an interrupted
    one resumes; the first failure stops the grid with one line."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    for k, (run_dir, args) in enumerate(runs):
        what, extra = f"grid {k + 1}/{len(runs)}: {run_dir}", []
        if _finished(run_dir):
            if not full_res or (run_dir / "eval-test-fullres.json").is_file():
                print(f"{what}: finished earlier, kept", flush=True)
                continue
            what += ": finished earlier; scoring best.pt at full resolution"
            extra = ["--eval-only", "--checkpoint", str(run_dir / "best.pt")]
        elif (run_dir / "last.pt").is_file():
            what, extra = what + " (resumed)", ["--resume"]
        print(what, flush=True)
        code = subprocess.run([*launcher, str(ROOT / "train.py"), *args, *extra]).returncode
        if code != 0:
            raise UserError(f"grid: {run_dir} stopped (exit {code}; its log: {run_dir / 'train.log'}); fix the cause "
                            "and rerun the same command: finished runs are kept, the others resume")


def main(argv=None):
    # No abbreviations: a train.py flag must never be taken for a prefix of the grid's own.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
                                     allow_abbrev=False, epilog="Every other flag is train.py's (train.py --help).")
    parser.add_argument("--grid-dir", default="runs/grid", help="folder of the grid's run folders")
    parser.add_argument("--full-res", action="store_true", help="also score each fold's selected checkpoint at full "
                        "resolution (train.py --full-res; its own columns in the comparison)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun when more than 1)")
    parser.add_argument("--list", action="store_true", help="print the runs and commands, run nothing")
    parser.add_argument("--emit", action="store_true", help="print one shell-quoted run per line (its folder, then "
                        "train.py's arguments), for slurm/submit_bench.sh")
    args, train_args = parser.parse_known_args(argv)

    def job():
        if args.nproc < 1:
            raise UserError(f"--nproc {args.nproc}: must be at least 1")
        grid_dir, out = Path(args.grid_dir), Path(args.grid_dir) / "comparison"
        runs = [(run_dir, run_args + ["--full-res"] * args.full_res) for run_dir, run_args in
                plan(train_args, grid_dir)]
        if args.emit:
            for run_dir, run_args in runs:
                print(shlex.join([str(run_dir), *run_args]))
            return
        if args.list:
            print(f"grid: {len(runs)} runs in {grid_dir}, one after another, then their comparison:")
            for _, run_args in runs:
                print(f"  {shlex.join(['python', 'train.py', *run_args])}")
            print(f"  {shlex.join(['python', 'compare.py', *(str(r) for r, _ in runs), '--out', str(out)])}")
            return
        run_grid(runs, args.full_res, args.nproc)
        from compare import compare
        compare([str(r) for r, _ in runs], out)
    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
