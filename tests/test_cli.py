"""The command lines as users meet them: --help fast and complete, the LR explained, --threads recorded."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script
import config
from labels import UserError


def flag_blocks(help_text):
    """{--flag: its help paragraph} of an argparse --help, whitespace folded."""
    blocks = re.split(r"\n(?=  -)", help_text)
    return {re.match(r"\s*(-[-\w]+)", block).group(1): " ".join(block.split()) for block in blocks[1:]
            if re.match(r"\s*-", block)}


@pytest.mark.parametrize("script", ["train.py", "bench.py", "predict.py"])
def test_help_lists_every_flag_with_its_default_and_units_by_group(script):
    done = run_script(script, "--help")
    assert done.returncode == 0, done.stderr
    blocks = flag_blocks(done.stdout)
    required = {"--checkpoint", "--out"} if script == "predict.py" else set()
    for flag, block in blocks.items():
        if flag != "-h" and flag not in required:
            assert "default" in block, f"{script} {flag}: no default in its help: {block}"
    if script != "predict.py":
        parser = config.build_parser()
        assert {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"} <= set(blocks)
        for group in ("data:", "model:", "optimisation:", "evaluation:", "distributed:", "output:"):
            assert f"\n{group}\n" in done.stdout
        assert "side of the square training crops" in blocks["--img-size"] and "(px" in blocks["--img-size"]
    if script == "bench.py":
        assert "\nbenchmark:\n" in done.stdout and "--bench-steps" in blocks
    if script == "predict.py":
        assert "--tile-batch N, --batch-size N" in done.stdout and "1.8x the tiles" in blocks["--overlap"]


def test_parsing_the_flags_loads_neither_torch_nor_timm():
    code = ("import sys, config; config.build_parser().format_help(); config.parse_args(['--threads', '2']); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("script", ["train.py", "bench.py", "predict.py"])
def test_help_answers_before_torch_is_imported(script):
    # Each script parses first when run as a program; a trace of imports shows torch never loads for --help.
    done = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "timm" not in imported


def test_lr_line_shows_how_the_lr_follows_from_the_flags_and_warns_outside_the_sane_range():
    cfg = {"lr": 0.05 * 8 / 96, "base_lr": 0.05, "batch_size": 8}
    assert config.lr_line(cfg) == ("lr 4.2e-03 = --lr 0.05 x batch 8 / 96", None)
    line, warning = config.lr_line({"lr": 1e-4 * 8 / 96, "base_lr": 1e-4, "batch_size": 8})
    assert line == "lr 8.3e-06 = --lr 0.0001 x batch 8 / 96"
    assert warning.startswith("warning: scaled lr 8.3e-06 is below 1e-05:")
    _, warning = config.lr_line({"lr": 2.0, "base_lr": 2.0, "batch_size": 96})
    assert warning.startswith("warning: scaled lr 2.0e+00 is above 0.1:")


def test_dry_run_prints_the_lr_line_and_records_the_threads_in_use(tmp_path):
    done = run_script("train.py", "--dry-run", "--encoder", "mit_b0", "--img-size", "64", "--batch-size", "8",
                      "--lr", "0.05", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert "lr 4.2e-03 = --lr 0.05 x batch 8 / 96" in done.stderr
    assert '"threads": 1' in done.stdout
    done = run_script("train.py", "--dry-run", "--lr", "0.0001", "--batch-size", "8", "--img-size", "64")
    assert "warning: scaled lr 8.3e-06 is below 1e-05" in done.stderr


def test_threads_below_one_is_one_error_line():
    with pytest.raises(UserError, match=r"--threads 0: must be at least 1 \(threads\)"):
        config.resolve_config(config.parse_args(["--threads", "0", "--img-size", "64"]), 1, _cpu())
    done = run_script("predict.py", "x.png", "--checkpoint", "c.pt", "--out", "o", "--threads", "0")
    assert done.returncode == 2 and done.stderr == "error: --threads 0: must be at least 1 (threads)\n"


def _cpu():
    import torch
    return torch.device("cpu")


def test_setup_applies_threads_records_them_and_prints_the_lr_line_on_rank_0(capsys, monkeypatch):
    import torch
    import train
    for name in ("RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    try:
        cfg = train.setup(config.parse_args(["--encoder", "mit_b0", "--img-size", "64", "--batch-size", "8",
                                             "--lr", "100", "--threads", "1"]))[0]
        assert cfg["threads"] == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    assert "lr 8.3e+00 = --lr 100 x batch 8 / 96\n" in out.out
    assert out.err.startswith("warning: scaled lr 8.3e+00 is above 0.1:")


def test_make_demo_runs_the_readme_command_and_ci_runs_make_test():
    if not shutil.which("make"):
        pytest.skip("no make here")
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith(".venv/bin/torchrun "))
    # Under `make test` (as .ci/run runs the tests) MAKEFLAGS carries VENV=.venv-ci; a user's plain shell has none.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV")}
    planned = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert planned.returncode == 0, planned.stderr
    assert command in " ".join(planned.stdout.replace("\\\n", " ").split())
    assert "make test VENV=.venv-ci" in (ROOT / ".ci" / "run").read_text() and "make test" in readme
