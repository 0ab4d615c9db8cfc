"""slurm/ as a cluster user relies on it, run against stub sbatch/srun/scontrol/torchrun executables."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

SLURM = ROOT / "slurm"
BENCH_ENCODERS = ["convnext_tiny", "mit_b3", "maxvit_tiny"]

# Each stub records what it was called with into $STUB_LOG (one NUL-separated argv file per call).
STUBS = {
    "sbatch": r"""#!/usr/bin/env bash
n=$(( $(cat "$STUB_LOG/counter" 2>/dev/null || echo 100) + 1 ))
echo "$n" > "$STUB_LOG/counter"
printf '%s\0' "$@" > "$STUB_LOG/sbatch-$n.args"
pwd > "$STUB_LOG/sbatch-$n.cwd"
for arg in "$@"; do
    if [ "$arg" = --parsable ]; then echo "$n;cluster"; exit 0; fi
done
echo "Submitted batch job $n"
""",
    "srun": r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$STUB_LOG/srun.args"
while [ "${1:-}" != "${1#--}" ]; do shift; done
exec "$@"
""",
    "scontrol": r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG/scontrol.log"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\nnode-b\n'; fi
if [ "$1 $2" = "show node" ]; then printf 'NodeName=%s Arch=x86_64 CoresPerSocket=8\n   NodeAddr=10.1.0.7 NodeHostName=%s\n' "$3" "$3"; fi
""",
    "torchrun": r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$STUB_LOG/torchrun.args"
pwd > "$STUB_LOG/torchrun.cwd"
echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > "$STUB_LOG/torchrun.shutdown-timeout"
echo "stub torchrun running"
if [ -n "${STUB_WAIT_FOR_TERM:-}" ]; then
    run_dir=$(while [ $# -gt 0 ]; do [ "$1" = --run-dir ] && echo "$2"; shift; done)
    sleep 60 &
    # Like torchrun: exit 1 after a SIGTERM, whether or not train.py saved (at its next step) a checkpoint.
    trap 'echo TERM > "$STUB_LOG/torchrun.signal"; kill $!; sleep 0.5
          if [ -n "${STUB_CHECKPOINT:-}" ]; then touch "$run_dir/last.pt"; echo "stub train.py saved last.pt"; fi
          exit 1' TERM
    touch "$STUB_LOG/torchrun.started"
    wait $!
    exit 1
fi
""",
}


@pytest.fixture
def cluster(tmp_path):
    """Environment of a login node whose Slurm commands are stubs; returns (env, stub log dir)."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "stub-log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(log_dir), PYTHON=sys.executable,
               LOG_DIR=str(tmp_path / "logs"))
    for name in ("ENCODER", "DATA", "RUN_DIR", "REPO", "DRY_RUN", "CV_DIR", "BENCH_DIR", "ENCODERS", "FOLDS"):
        env.pop(name, None)
    return env, log_dir


def bash(script, *args, env, cwd, timeout=120):
    return subprocess.run(["bash", str(script), *map(str, args)], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)


def argv(path):
    return path.read_text().split("\0")[:-1]


def submissions(log_dir):
    """Recorded sbatch calls in submission order: (job id, sbatch options, script, script arguments, cwd)."""
    calls = []
    for path in sorted(log_dir.glob("sbatch-*.args"), key=lambda p: int(p.stem.split("-")[1])):
        job_id = path.stem.split("-")[1]
        args = argv(path)
        at = next(i for i, a in enumerate(args) if a.endswith((".sbatch", ".sh")))
        cwd = Path(path.with_suffix(".cwd").read_text().strip())
        calls.append((job_id, args[:at], args[at], args[at + 1:], cwd))
    return calls


def run_as_slurm_job(tmp_path, script, args, env, submit_dir, **slurm_env):
    """Runs a job script the way slurmd does: a copy in a spool folder, started in the submit directory."""
    spool = tmp_path / "spool" / f"job{slurm_env.get('SLURM_JOB_ID', '1')}"
    spool.mkdir(parents=True, exist_ok=True)
    copy = spool / "slurm_script"
    shutil.copy(submit_dir / script, copy)
    job_env = dict(env, SLURM_SUBMIT_DIR=str(submit_dir), **slurm_env)
    return bash(copy, *args, env=job_env, cwd=submit_dir)


MISSING = [name for name in ("train.py", "model.py", "data.py", "losses.py", "weights.py")
           if not (ROOT / name).is_file()]
needs_train_py = pytest.mark.skipif(bool(MISSING), reason=f"not written yet: {', '.join(MISSING)} (train.py needs them)")


def test_every_script_parses_as_bash():
    scripts = [ROOT / "bench.sh", *sorted(SLURM.glob("*.sbatch")), *sorted(SLURM.glob("*.sh"))]
    assert {"train.sbatch", "cv.sbatch", "multinode.sbatch", "compare.sbatch", "submit_cv.sh", "submit_bench.sh"} <= {
        s.name for s in scripts}
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_fair_benchmark_is_one_chain_of_nine_runs_then_the_comparison(cluster, tmp_path):
    env, log_dir = cluster
    result = bash(SLURM / "submit_bench.sh", "--epochs", "2", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    calls = submissions(log_dir)
    assert len(calls) == 10
    previous, run_dirs = None, []
    for (job_id, options, script, args, cwd), (encoder, fold) in zip(calls, product(BENCH_ENCODERS, range(3))):
        assert cwd == ROOT and script == "slurm/train.sbatch"
        assert "--parsable" in options
        dependencies = [o for o in options if o.startswith("--dependency")]
        assert dependencies == ([] if previous is None else [f"--dependency=afterok:{previous}"])
        run_dirs.append(f"runs/bench/{encoder}/fold{fold}")
        assert args == ["--encoder", encoder, "--epochs", "2", "--folds", "3", "--fold", str(fold),
                        "--run-dir", run_dirs[-1]]
        previous = job_id
    _, options, script, args, _ = calls[-1]
    assert script == "slurm/compare.sbatch"
    assert f"--dependency=afterok:{previous}" in options
    assert args == ["--out", "runs/bench/comparison", *run_dirs]


def test_any_grid_of_train_flags_is_one_chain_of_runs_named_by_their_values(cluster, tmp_path):
    env, log_dir = cluster
    result = bash(SLURM / "submit_bench.sh", "--encoder", "mit_b0", "--loss", "dice|dicefocal", "--class-weights",
                  "none|inverse_sqrt_log_scaled", "--epochs", "2", env=dict(env, FOLDS="2", BENCH_DIR="runs/ablation"),
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    calls = submissions(log_dir)
    expected = [(loss, weights, fold) for loss, weights, fold in
                product(["dice", "dicefocal"], ["none", "inverse_sqrt_log_scaled"], range(2))]
    assert len(calls) == len(expected) + 1
    for (_, options, _, args, _), (loss, weights, fold) in zip(calls, expected):
        run_dir = f"runs/ablation/{loss}-{weights}/fold{fold}"
        assert args == ["--encoder", "mit_b0", "--loss", loss, "--class-weights", weights, "--epochs", "2",
                        "--folds", "2", "--fold", str(fold), "--run-dir", run_dir]
        assert f"--job-name=bench-{loss}-{weights}-fold{fold}" in options, "no slash in a job (and log file) name"
    assert calls[-1][3][:2] == ["--out", "runs/ablation/comparison"] and len(calls[-1][3]) == 2 + len(expected)

    result = bash(SLURM / "submit_bench.sh", "--loss", "dice|dicefocl", env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "dicefocl" in result.stderr
    assert len(submissions(log_dir)) == len(expected) + 1, "a bad flag submits nothing"


def test_help_prints_the_usage_and_submits_nothing(cluster, tmp_path):
    env, log_dir = cluster
    for script, flag in product(("submit_bench.sh", "submit_cv.sh"), ("--help", "-h")):
        result = bash(SLURM / script, "mit_b0", flag, env=env, cwd=tmp_path)
        assert result.returncode == 0 and result.stdout.startswith("Submits ") and "#" not in result.stdout[:2]
        assert f"slurm/{script}" in result.stdout
    assert not list(log_dir.glob("sbatch-*"))


def test_a_listed_grid_needs_no_sbatch_and_submits_nothing(cluster, tmp_path):
    env, log_dir = cluster
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    (bare / "dirname").symlink_to(shutil.which("dirname"))
    result = subprocess.run(["/bin/bash", str(SLURM / "submit_bench.sh"), "--list", "--loss", "dice|focal"],
                            env=dict(env, PATH=str(bare), FOLDS="2"), cwd=tmp_path, text=True, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * 2 * 2 + 2 and lines[-1].endswith("nothing submitted (--list)")
    assert "slurm/train.sbatch --encoder mit_b3 --loss focal --folds 2 --fold 1 --run-dir runs/bench/mit_b3-focal/fold1" \
        in result.stdout
    assert lines[-2].startswith("would submit: sbatch --dependency=afterok:JOB") and "slurm/compare.sbatch" in lines[-2]
    assert not list(log_dir.glob("sbatch-*"))


def test_cross_validation_submits_a_fold_array_and_a_dependent_summary(cluster, tmp_path):
    env, log_dir = cluster
    result = bash(SLURM / "submit_cv.sh", "mit_b0", "2", "--img-size", "64", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (array_id, array_options, array_script, array_args, _), (_, options, script, args, _) = submissions(log_dir)
    assert array_script == "slurm/cv.sbatch" and "--array=0-1" in array_options
    assert array_args == ["--encoder", "mit_b0", "--folds", "2", "--img-size", "64"]
    assert script == "slurm/summary.sbatch" and args == ["runs/cv-mit_b0"]
    assert f"--dependency=afterok:{array_id}" in options
    assert (tmp_path / "logs").is_dir(), "the --output directory must exist before Slurm opens it"


def submitted_jobs(env, log_dir, cwd):
    """The fair benchmark's chain and a 2-fold CV array, as recorded by the stub sbatch."""
    assert bash(SLURM / "submit_bench.sh", env=env, cwd=cwd).returncode == 0
    bench_calls = submissions(log_dir)
    for path in log_dir.glob("sbatch-*"):
        path.unlink()
    assert bash(SLURM / "submit_cv.sh", "mit_b0", "2", "--img-size", "64", env=env, cwd=cwd).returncode == 0
    return bench_calls[:9], submissions(log_dir)[0]


@needs_train_py
def test_every_submitted_job_passes_arguments_train_py_accepts(cluster, tmp_path, capsys):
    import train
    env, log_dir = cluster
    bench_calls, cv_call = submitted_jobs(env, log_dir, tmp_path)
    argument_lists = [(args, args[args.index("--encoder") + 1], int(args[args.index("--fold") + 1]))
                      for _, _, _, args, _ in bench_calls]
    argument_lists += [(cv_call[3] + ["--fold", str(k), "--run-dir", f"runs/cv-mit_b0/fold{k}"], "mit_b0", k)
                       for k in (0, 1)]
    for args, encoder, fold in argument_lists:
        assert train.main([*args, "--data", "synthetic", "--dry-run"]) == 0, args
        config = json.loads(capsys.readouterr().out)
        assert (config["encoder"], config["fold"]) == (encoder, fold)


@needs_train_py
def test_a_dry_run_job_resolves_its_config_without_training(cluster, tmp_path):
    env, log_dir = cluster
    bench_calls, cv_call = submitted_jobs(env, log_dir, tmp_path)
    jobs = [(bench_calls[-1], {}, "maxvit_tiny", 2, "runs/bench/maxvit_tiny/fold2"),
            (cv_call, {"SLURM_ARRAY_TASK_ID": "1"}, "mit_b0", 1, "runs/cv-mit_b0/fold1")]
    for (job_id, _, script, args, cwd), array_env, encoder, fold, run_dir in jobs:
        existed = (ROOT / run_dir).exists()
        result = run_as_slurm_job(tmp_path, script, args, dict(env, DRY_RUN="1"), cwd,
                                  SLURM_JOB_ID=job_id, SLURM_GPUS_ON_NODE="2", **array_env)
        assert result.returncode == 0, f"{script} {args}: {result.stderr}"
        config = json.loads(result.stdout)
        assert (config["encoder"], config["fold"], config["run_dir"]) == (encoder, fold, run_dir)
        assert (ROOT / run_dir).exists() == existed, "a dry run must not create its run directory"
    assert not (log_dir / "torchrun.args").exists()


@needs_train_py
def test_summary_job_writes_mean_and_std_over_folds(cluster, tmp_path):
    env, _ = cluster
    cv_dir = tmp_path / "runs" / "cv-mit_b0"
    best = [0.40, 0.50, 0.60]
    for k, miou in enumerate(best):
        (cv_dir / f"fold{k}").mkdir(parents=True)
        (cv_dir / f"fold{k}" / "config.json").write_text(json.dumps({"encoder": "mit_b0", "select": "inner",
                                                                     "fold": k}))
        records = [{"epoch": 1, "train_loss": 1.0, "val": {"miou": 0.9, "iou": {"Clean": 0.9}}},
                   {"test": {"miou": miou, "binary_iou": 0.7, "iou": {"Clean": 0.95}}, "selected_epoch": 1}]
        (cv_dir / f"fold{k}" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in records))
    result = run_as_slurm_job(tmp_path, "slurm/summary.sbatch", [cv_dir], env, ROOT, SLURM_JOB_ID="9")
    assert result.returncode == 0, result.stderr
    table = (cv_dir / "summary.md").read_text()
    miou_row = next(line for line in table.splitlines() if line.startswith("| miou |"))
    assert f"{100 * np.mean(best):.2f} ± {100 * np.std(best, ddof=1):.2f}" in miou_row
    assert table.strip() in result.stdout


def finished_run(run_dir, loss, fold, rng):
    """A made-up finished fold as train.py leaves it for compare.py: config, test record, per-image matrices."""
    import torch
    from labels import artefact_scheme, scheme_to_dict
    from metrics import iou_report
    from runs import write_per_image
    scheme = artefact_scheme()
    run_dir.mkdir(parents=True)
    matrices = rng.integers(0, 50, (4, 16, 16)) + np.diag(rng.integers(100, 400, 16))
    fine = matrices.sum(0)
    (run_dir / "config.json").write_text(json.dumps({"encoder": "mit_b0", "loss": loss, "fold": fold,
                                                     "select": "inner", "work_size": 1024, "img_size": 384,
                                                     "classes": scheme_to_dict(scheme)}))
    record = {"test": iou_report(torch.from_numpy(fine), list(scheme.names), 0), "selected_epoch": 1}
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "img_s": 9.0}) + "\n"
                                           + json.dumps(record) + "\n")
    (run_dir / "confusion.json").write_text(json.dumps({"fine": fine.tolist()}))
    write_per_image(run_dir / "confusion_per_image.npz", [f"image{fold}-{k}" for k in range(4)], matrices)


def test_compare_job_writes_the_comparison_of_the_runs_given(cluster, tmp_path):
    env, _ = cluster
    rng = np.random.default_rng(42)
    runs = [tmp_path / "runs" / loss / f"fold{fold}" for loss in ("dice", "focal") for fold in (0, 1)]
    for run_dir in runs:
        finished_run(run_dir, run_dir.parent.name, int(run_dir.name[-1]), rng)
    out = tmp_path / "runs" / "comparison"
    result = run_as_slurm_job(tmp_path, "slurm/compare.sbatch", ["--out", out, *runs], env, ROOT, SLURM_JOB_ID="5")
    assert result.returncode == 0, result.stderr
    table = (out / "comparison.md").read_text()
    assert "| loss=dice | loss=focal |" in table and table in result.stdout
    result = run_as_slurm_job(tmp_path, "slurm/compare.sbatch", [out], dict(env, DRY_RUN="1"), ROOT,
                              SLURM_JOB_ID="6")
    assert result.returncode == 0 and result.stdout.startswith("compare.sbatch: dry run: ")


def test_train_job_runs_one_torchrun_process_per_gpu_and_logs_into_the_run_dir(cluster, tmp_path):
    env, log_dir = cluster
    run_dir = tmp_path / "run"
    result = run_as_slurm_job(tmp_path, "slurm/train.sbatch", ["--encoder", "convnext_tiny", "--epochs", "3"],
                              dict(env, RUN_DIR=str(run_dir)), ROOT, SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="2")
    assert result.returncode == 0, result.stderr
    assert argv(log_dir / "torchrun.args") == [
        "--standalone", "--nproc_per_node=2", "train.py", "--data", "synthetic", "--run-dir", str(run_dir),
        "--encoder", "convnext_tiny", "--epochs", "3"]
    assert Path((log_dir / "torchrun.cwd").read_text().strip()) == ROOT
    log = run_dir / "logs" / "slurm-4242.log"
    for _ in range(50):  # tee flushes after the script's own exit
        if log.is_file() and "stub torchrun running" in log.read_text():
            break
        time.sleep(0.1)
    assert "stub torchrun running" in log.read_text()


def test_environment_supplies_encoder_data_and_run_dir_when_flags_do_not(cluster, tmp_path):
    env, log_dir = cluster
    data_dir, run_dir = tmp_path / "artefact", tmp_path / "run"
    (data_dir / "images").mkdir(parents=True)
    result = run_as_slurm_job(tmp_path, "slurm/train.sbatch", ["--lr", "5e-4"],
                              dict(env, ENCODER="maxvit_tiny", DATA=str(data_dir), RUN_DIR=str(run_dir)), ROOT,
                              SLURM_JOB_ID="7", SLURM_GPUS_ON_NODE="2")
    assert result.returncode == 0, result.stderr
    assert argv(log_dir / "torchrun.args")[3:] == [
        "--encoder", "maxvit_tiny", "--data", str(data_dir), "--run-dir", str(run_dir), "--lr", "5e-4"]


def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path):
    env, log_dir = cluster
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    slurm_env = dict(SLURM_JOB_ID="11", SLURM_GPUS_ON_NODE="2", SLURM_RESTART_COUNT="1")
    args = ["--encoder", "mit_b3", "--run-dir", run_dir]

    assert run_as_slurm_job(tmp_path, "slurm/train.sbatch", args, env, ROOT, **slurm_env).returncode == 0
    assert "--resume" not in argv(log_dir / "torchrun.args"), "no checkpoint yet: the restart starts fresh"

    (run_dir / "last.pt").write_bytes(b"checkpoint")
    assert run_as_slurm_job(tmp_path, "slurm/train.sbatch", args, env, ROOT, **slurm_env).returncode == 0
    assert argv(log_dir / "torchrun.args")[-1] == "--resume"


def start_waiting_train_job(env, log_dir, run_dir, **extra):
    """train.sbatch in its own session, as slurmd starts a batch job, once the stub torchrun is running."""
    job_env = dict(env, STUB_WAIT_FOR_TERM="1", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242",
                   SLURM_GPUS_ON_NODE="2", **extra)
    job = subprocess.Popen(["bash", str(SLURM / "train.sbatch"), "--run-dir", str(run_dir)], env=job_env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for _ in range(300):
        if (log_dir / "torchrun.started").exists() or job.poll() is not None:
            break
        time.sleep(0.1)
    assert (log_dir / "torchrun.started").exists(), job.communicate(timeout=30)
    return job


@pytest.mark.parametrize("saved", [True, False], ids=["checkpoint-saved", "no-checkpoint"])
def test_sigterm_reaches_torchrun_and_the_job_requeues_itself(cluster, tmp_path, saved):
    env, log_dir = cluster
    job = start_waiting_train_job(env, log_dir, tmp_path / "run", **({"STUB_CHECKPOINT": "1"} if saved else {}))
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == (0 if saved else 1), "a clean checkpoint is a success, torchrun's exit 1 is not"
    assert (log_dir / "torchrun.signal").read_text().strip() == "TERM"
    assert int((log_dir / "torchrun.shutdown-timeout").read_text()) >= 60, "workers need time to checkpoint"
    assert "requeue 4242" in (log_dir / "scontrol.log").read_text().splitlines()


def test_job_wide_sigterm_keeps_the_log_and_the_job_alive(cluster, tmp_path):
    """Requeue, pre-emption and `scancel --full` send SIGTERM to every process of the job, tee included."""
    env, log_dir = cluster
    run_dir = tmp_path / "run"
    job = start_waiting_train_job(env, log_dir, run_dir, STUB_CHECKPOINT="1")
    os.killpg(job.pid, signal.SIGTERM)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == 0, stderr
    log = run_dir / "logs" / "slurm-4242.log"
    for _ in range(50):  # tee flushes after the script's own exit
        if "requeueing job 4242" in log.read_text():
            break
        time.sleep(0.1)
    text = log.read_text()
    assert "stub train.py saved last.pt" in text and "requeueing job 4242" in text, text
    assert "requeue 4242" in (log_dir / "scontrol.log").read_text().splitlines()


def test_cv_array_task_trains_its_own_fold(cluster, tmp_path):
    env, log_dir = cluster
    result = run_as_slurm_job(tmp_path, "slurm/cv.sbatch", ["--encoder", "mit_b0", "--folds", "2"],
                              dict(env, CV_DIR=str(tmp_path / "cv")), ROOT,
                              SLURM_JOB_ID="12", SLURM_ARRAY_TASK_ID="1", SLURM_GPUS_ON_NODE="2")
    assert result.returncode == 0, result.stderr
    args = argv(log_dir / "torchrun.args")
    assert args[:3] == ["--standalone", "--nproc_per_node=2", "train.py"]
    assert args[3:] == ["--data", "synthetic", "--encoder", "mit_b0", "--folds", "2",
                        "--fold", "1", "--run-dir", str(tmp_path / "cv" / "fold1")]


def test_multinode_job_starts_one_torchrun_per_node_meeting_on_the_first_node(cluster, tmp_path):
    env, log_dir = cluster
    result = run_as_slurm_job(tmp_path, "slurm/multinode.sbatch", ["--encoder", "mit_b3"],
                              dict(env, RUN_DIR=str(tmp_path / "run")), ROOT, SLURM_JOB_ID="555",
                              SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4",
                              SLURM_CPUS_PER_TASK="16")
    assert result.returncode == 0, result.stderr
    srun = argv(log_dir / "srun.args")
    # A job step does not inherit the job's CPUs per task (Slurm 22.05+): srun must pass them on.
    assert srun[:srun.index("torchrun")] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=16"]
    port = 20000 + 555 % 20000
    assert argv(log_dir / "torchrun.args") == [
        "--nnodes=2", "--nproc_per_node=4", "--rdzv_id=555", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=10.1.0.7:{port}", "train.py", "--data", "synthetic", "--run-dir", str(tmp_path / "run"),
        "--encoder", "mit_b3"]
    assert "show node node-a" in (log_dir / "scontrol.log").read_text().splitlines(), "node names need not resolve"

    result = run_as_slurm_job(tmp_path, "slurm/multinode.sbatch", ["--encoder", "mit_b3"],
                              dict(env, RUN_DIR=str(tmp_path / "run"), MASTER_ADDR="node-a-ib"), ROOT,
                              SLURM_JOB_ID="556", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2")
    assert result.returncode == 0, result.stderr
    assert f"--rdzv_endpoint=node-a-ib:{20556}" in argv(log_dir / "torchrun.args")


def test_multinode_job_has_no_fixed_node_count():
    """A --nodes the partition cannot offer waits forever; the count comes from `sbatch --nodes=N`."""
    lines = (SLURM / "multinode.sbatch").read_text().splitlines()
    assert not [line for line in lines if line.startswith("#SBATCH --nodes")]


def test_cpu_and_gpu_counts_from_the_environment_reach_sbatch(cluster, tmp_path):
    env, log_dir = cluster
    env = dict(env, CPUS_PER_TASK="2", GPUS_PER_NODE="0")
    assert bash(SLURM / "submit_cv.sh", "mit_b0", "2", env=env, cwd=tmp_path).returncode == 0
    assert bash(SLURM / "submit_bench.sh", env=env, cwd=tmp_path).returncode == 0
    calls = submissions(log_dir)
    assert len(calls) == 2 + 10
    for _, options, script, _, _ in calls:
        expected = [] if script in ("slurm/summary.sbatch", "slurm/compare.sbatch") else ["--cpus-per-task=2",
                                                                                            "--gpus-per-node=0"]
        assert [o for o in options if o.startswith(("--cpus", "--gpus"))] == expected, script

    result = bash(SLURM / "submit_cv.sh", "mit_b0", env=dict(env, CPUS_PER_TASK="all"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: CPUS_PER_TASK=all; set it to a number of CPUs (1 or more)"]
    assert len(submissions(log_dir)) == 12


def test_missing_dataset_fails_before_launching_with_one_line(cluster, tmp_path):
    env, log_dir = cluster
    (tmp_path / "empty").mkdir()
    result = run_as_slurm_job(tmp_path, "slurm/train.sbatch", ["--data", tmp_path / "empty"], env, ROOT,
                              SLURM_JOB_ID="3", SLURM_GPUS_ON_NODE="2")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: train.sbatch: data folder {tmp_path / 'empty'} has no images/; set DATA (or --data) to a folder "
        "with images/ and annotations/, or DATA=synthetic"]
    assert not (log_dir / "torchrun.args").exists()


def test_missing_torch_fails_before_submitting_with_one_line(cluster, tmp_path):
    env, log_dir = cluster
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    result = bash(SLURM / "submit_bench.sh", env=dict(env, PYTHON=str(no_torch)), cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "cannot import torch" in result.stderr
    assert not list(log_dir.glob("sbatch-*"))

    result = bash(SLURM / "submit_cv.sh", "mit_b3", env=dict(env, PYTHON=str(tmp_path / "nowhere")), cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "not found" in result.stderr


def test_wrong_venv_fails_with_one_line(cluster, tmp_path):
    env, log_dir = cluster
    venv = tmp_path / "no-venv"
    result = run_as_slurm_job(tmp_path, "slurm/train.sbatch", [], dict(env, VENV=str(venv)), ROOT,
                              SLURM_JOB_ID="3", SLURM_GPUS_ON_NODE="2")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: VENV={venv} has no bin/activate; set VENV to a virtual environment "
        "(or PYTHON=/path/to/venv/bin/python)"]
    assert not (log_dir / "torchrun.args").exists()
