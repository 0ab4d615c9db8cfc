"""slurm/ on a real Slurm: munged, slurmctld and two slurmd nodes started on this host, CPU only.

Needs root; installs Debian's slurm-wlm and munge when they are missing. Every daemon runs from a
throw-away slurm.conf with private ports and state under a pytest tmp folder, and is stopped by its pid.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, apt_install, module_folder

# Tiny synthetic runs; 20 epochs of 2 steps leave a few seconds to interrupt one mid-run.
DATA_ARGS = ["--data", "synthetic", "--synthetic-count", "16", "--synthetic-size", "64", "--img-size", "64",
             "--batch-size", "4", "--norm", "gn", "--no-report"]
TRAIN_ARGS = ["--encoder", "mit_b0", *DATA_ARGS]
EPOCHS = 20
DAEMONS = [Path("/usr/sbin/munged"), Path("/usr/sbin/slurmctld"), Path("/usr/sbin/slurmd")]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Timing and memory differ between runs; everything else in metrics.jsonl must not.
UNSTABLE = {"img_s", "epoch_time_s", "peak_mem_mb"}


def install_slurm():
    if os.geteuid() != 0:
        pytest.skip("needs root to install slurm-wlm/munge and start munged, slurmctld and slurmd")
    apt_install(["slurm-wlm", "munge"], lambda: all(path.exists() for path in DAEMONS))


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Cluster:
    def __init__(self, root):
        self.root = root
        self.logs = root / "logs"
        self.daemons = []
        ctld_port, port1, port2 = free_ports(3)
        munge = root / "munge"
        munge.mkdir(mode=0o700)
        (munge / "munge.key").write_bytes(os.urandom(128))
        (munge / "munge.key").chmod(0o400)
        for name in ("state", "spool/n1", "spool/n2", "daemon-logs", "logs", "runs"):
            (root / name).mkdir(parents=True)
        cpus = os.cpu_count()
        host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        # cred_expire also sets how long a requeued job is held back (default 120 s), and it must not be
        # skipped with `scontrol update StartTime=now`: the restart would meet the revoked credential.
        self.conf.write_text(f"""\
ClusterName=pytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/daemon-logs/slurmctld.log
SlurmdLogFile={root}/daemon-logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=10
NodeName=n1 NodeHostname=n1 NodeAddr=127.0.0.1 Port={port1} CPUs={cpus} State=UNKNOWN
NodeName=n2 NodeHostname=n2 NodeAddr=127.0.0.1 Port={port2} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        for name in ("ENCODER", "DATA", "RUN_DIR", "REPO", "DRY_RUN", "CV_DIR", "BENCH_DIR", "ENCODERS", "FOLDS",
                     "VENV", "PYTHON", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            base.pop(name, None)
        base["SLURM_CONF"] = str(self.conf)
        self.daemon_env = base
        # What a user exports on a CPU-only cluster (slurm/README-cluster.md); sbatch passes it to the job.
        python_env = {"VENV": sys.prefix} if sys.prefix != sys.base_prefix else {"PYTHON": sys.executable}
        self.env = dict(base, OMP_NUM_THREADS="1", LOG_DIR=str(self.logs), CPUS_PER_TASK="1", GPUS_PER_NODE="0",
                        **python_env)
        self.munge_socket = munge / "socket"
        self.munge_command = ["/usr/sbin/munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                              f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                              f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"]

    def start(self):
        self._start("munged", self.munge_command)
        self._wait(lambda: self.munge_socket.exists(), 30, "munged did not create its socket")
        self._start("slurmctld", ["/usr/sbin/slurmctld", "-D"])
        for node in ("n1", "n2"):
            self._start(f"slurmd-{node}", ["/usr/sbin/slurmd", "-D", "-N", node])
        self._wait(lambda: self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split() == ["n1", "idle", "n2", "idle"],
                   60, "the two nodes did not come up idle")

    def _start(self, name, command):
        with open(self.root / "daemon-logs" / f"{name}.out", "w") as out:
            self.daemons.append(subprocess.Popen(command, env=self.daemon_env, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL))

    def _wait(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [d.args[0] for d in self.daemons if d.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                                 for p in sorted((self.root / "daemon-logs").iterdir()))
                raise RuntimeError(f"{what} (exited: {dead})\n{logs}")
            time.sleep(0.5)

    def stop(self):
        """Cancels this cluster's jobs, then stops exactly the daemons started here, newest first."""
        if len(self.daemons) > 1:  # slurmctld was started
            self.run("scancel", "--user=root")
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    def run(self, *command, env=None, **kwargs):
        return subprocess.run(command, env=env or self.env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              **kwargs)

    def sbatch(self, *args):
        """Submits from the repository root as a user would, with the CPU-only overrides on the command line."""
        result = self.run("sbatch", "--parsable", "--cpus-per-task=1", "--gpus-per-node=0",
                          f"--output={self.logs}/%x-%j.out", *map(str, args))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job_id):
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def wait(self, job_id, timeout=240):
        deadline = time.monotonic() + timeout
        while True:
            state = self.job(job_id)
            if state.get("JobState") in FINISHED:
                return state
            if time.monotonic() > deadline:
                self.run("scancel", job_id)
                pytest.fail(f"job {job_id} not finished after {timeout} s: {state}\n{self.output(job_id)}")
            time.sleep(0.5)

    def wait_until_running(self, job_id, timeout=180):
        deadline = time.monotonic() + timeout
        while (state := self.job(job_id)).get("JobState") != "RUNNING":
            assert time.monotonic() < deadline and state.get("JobState") not in FINISHED, self.output(job_id)
            time.sleep(0.5)

    def output(self, job_id):
        return "\n".join(p.read_text() for p in sorted(self.logs.glob(f"*-{job_id}*.out")))


@pytest.fixture(scope="module")
def slurm(request, tmp_path_factory):
    install_slurm()
    with module_folder(request, tmp_path_factory, "slurm") as base:
        cluster = Cluster(base)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def epochs(run_dir):
    return [m for m in metrics(run_dir) if "epoch" in m]


def final_miou(run_dir):
    return next(m["test"]["miou"] for m in metrics(run_dir) if "test" in m)


def stable(records):
    return [{k: v for k, v in record.items() if k not in UNSTABLE} for record in records]


@pytest.fixture(scope="module")
def uninterrupted(slurm):
    run_dir = slurm.root / "runs" / "uninterrupted"
    job_id = slurm.sbatch("slurm/train.sbatch", *TRAIN_ARGS, "--epochs", EPOCHS, "--run-dir", run_dir)
    return job_id, run_dir, slurm.wait(job_id)


def test_train_job_completes_with_checkpoints_and_metrics(slurm, uninterrupted):
    job_id, run_dir, state = uninterrupted
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), slurm.output(job_id)
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
    assert [m["epoch"] for m in epochs(run_dir)] == list(range(1, EPOCHS + 1))
    log = (run_dir / "logs" / f"slurm-{job_id}.log").read_text()
    assert f"test mIoU {final_miou(run_dir):.4f}" in log


def test_cross_validation_array_then_the_summary_job(slurm):
    cv_dir = slurm.root / "runs" / "cv"
    result = slurm.run("bash", "slurm/submit_cv.sh", "mit_b0", "2", *DATA_ARGS, "--epochs", "2",
                       env=dict(slurm.env, CV_DIR=str(cv_dir)))
    assert result.returncode == 0, result.stderr
    array_id, summary_id = re.search(r"array job (\d+) and the summary as job (\d+)", result.stdout).groups()
    state = slurm.wait(summary_id)
    assert state["JobState"] == "COMPLETED", slurm.output(array_id) + slurm.output(summary_id)
    best = [final_miou(cv_dir / f"fold{k}") for k in (0, 1)]
    assert all(len(epochs(cv_dir / f"fold{k}")) == 2 for k in (0, 1))
    miou_row = next(line for line in (cv_dir / "summary.md").read_text().splitlines() if line.startswith("| miou |"))
    assert f"{100 * np.mean(best):.2f} ± {100 * np.std(best, ddof=1):.2f}" in miou_row
    assert miou_row in slurm.output(summary_id)


def test_a_grid_is_one_chain_of_runs_then_the_comparison_job(slurm):
    bench_dir = slurm.root / "runs" / "bench"
    result = slurm.run("bash", "slurm/submit_bench.sh", "--encoder", "mit_b0", "--loss", "dice|focal", *DATA_ARGS,
                       "--epochs", "1", env=dict(slurm.env, BENCH_DIR=str(bench_dir), FOLDS="2"))
    assert result.returncode == 0, result.stderr
    compare_id = re.search(r"the comparison of 4 runs as job (\d+)", result.stdout).group(1)
    state = slurm.wait(compare_id, timeout=600)
    run_ids = re.findall(r"as job (\d+)", result.stdout)[:-1]
    assert state["JobState"] == "COMPLETED", "\n".join(slurm.output(j) for j in [*run_ids, compare_id])
    table = json.loads((bench_dir / "comparison" / "comparison.json").read_text())
    assert [row["label"] for row in table["rows"]] == ["loss=dice", "loss=focal"]
    for row, loss in zip(table["rows"], ("dice", "focal")):
        folds = [final_miou(bench_dir / loss / f"fold{k}") for k in (0, 1)]
        assert row["miou"]["mean"] == pytest.approx(np.mean(folds))
    assert (bench_dir / "comparison" / "comparison.md").read_text() in slurm.output(compare_id)


def interrupt_after(slurm, job_id, log, line, scancel_options):
    """Sends SIGTERM with scancel once the job's log has `line` after its latest start."""
    deadline = time.monotonic() + 180
    while not (log.is_file() and line in log.read_text().rsplit(" restart ", 1)[-1]):
        assert time.monotonic() < deadline and slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING"), \
            slurm.output(job_id)
        time.sleep(0.2)
    result = slurm.run("scancel", "--signal=TERM", *scancel_options, job_id)
    assert result.returncode == 0, result.stderr


def test_sigterm_requeues_and_the_resumed_run_ends_like_an_uninterrupted_one(slurm, uninterrupted):
    _, reference_dir, reference_state = uninterrupted
    assert reference_state["JobState"] == "COMPLETED"
    run_dir = slurm.root / "runs" / "interrupted"
    job_id = slurm.sbatch("slurm/train.sbatch", *TRAIN_ARGS, "--epochs", EPOCHS, "--run-dir", run_dir)
    log = run_dir / "logs" / f"slurm-{job_id}.log"
    # As pre-emption does: the batch shell only, then (scancel --full) every process of the job, tee included.
    interrupt_after(slurm, job_id, log, f"epoch 2/{EPOCHS} ", ["--batch"])
    deadline = time.monotonic() + 180
    while (state := slurm.job(job_id)).get("Restarts") != "1":
        assert time.monotonic() < deadline and state.get("JobState") not in FINISHED, slurm.output(job_id)
        time.sleep(0.2)
    slurm.wait_until_running(job_id)
    interrupt_after(slurm, job_id, log, f"epoch 6/{EPOCHS} ", ["--full"])
    state = slurm.wait(job_id)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "2"), text
    assert text.count("SIGTERM: saved") == 2 and text.count(f"requeueing job {job_id}") == 2, text
    assert text.count("torchrun exited with 1, the job with 0") == 2, text
    assert text.count(f"resumed {run_dir} at epoch") == 2, text
    assert stable(metrics(run_dir)) == stable(metrics(reference_dir))


def test_multinode_job_runs_one_rank_on_each_of_two_nodes(slurm):
    run_dir = slurm.root / "runs" / "multinode"
    job_id = slurm.sbatch("--nodes=2", "slurm/multinode.sbatch", *TRAIN_ARGS, "--epochs", "2", "--run-dir", run_dir)
    state = slurm.wait(job_id)
    assert (state["JobState"], state["ExitCode"], state["NodeList"]) == ("COMPLETED", "0:0", "n[1-2]"), \
        slurm.output(job_id)
    log = (run_dir / "logs" / f"slurm-{job_id}.log").read_text()
    assert "== rendezvous 127.0.0.1:" in log, "the first node's NodeAddr, not its name n1"
    assert "on cpu x2:" in log
    assert len(epochs(run_dir)) == 2
