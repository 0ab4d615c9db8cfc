"""Shared fixtures: the repository root on sys.path and one small synthetic damage set per test session."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tests share two cores; one thread per process keeps multi-process tests from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def scratch_temp(tmp_path_factory):
    """The temp folder of every process a test starts: torchrun's launcher leaves an empty torchelastic_* log
    folder per launch in it, and those go with the session's temp folders instead of piling up in /tmp; so does
    torch.compile's cache (the colour augmentation's passes, the compiled rows), which this process would
    otherwise put under the /tmp it saw first."""
    settings = {"TMPDIR": tmp_path_factory.mktemp("temp"),
                "TORCHINDUCTOR_CACHE_DIR": tmp_path_factory.mktemp("inductor")}
    before, first_temp = {name: os.environ.get(name) for name in settings}, tempfile.tempdir
    os.environ.update({name: str(path) for name, path in settings.items()})
    tempfile.tempdir = None  # read TMPDIR again (inductor puts its C++ headers under tempfile.gettempdir())
    yield
    tempfile.tempdir = first_temp
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from synthetic import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "set", count=24, size=96, seed=42)


@contextmanager
def module_folder(request, tmp_path_factory, name):
    """A fresh folder for a module-scoped fixture, removed once the module's tests end (pytest.ini's retention
    policy covers tmp_path only); kept when one of them failed, to look at."""
    folder = tmp_path_factory.mktemp(name)
    failed_before = request.session.testsfailed
    yield folder
    if request.session.testsfailed == failed_before:
        shutil.rmtree(folder, ignore_errors=True)


def run_script(*args, env=None, timeout=300, cwd=None):
    """Runs a project script as a user would; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, PYTHONHASHSEED="0", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


# The flags of one tiny run (2 epochs of mit_b0 at 64 px on the session's synthetic set, ~20 s on 2 cores).
def tiny_flags(data_root, run_dir, *extra):
    return ["--encoder", "mit_b0", "--img-size", "64", "--norm", "gn", "--batch-size", "4", "--epochs", "2",
            "--data", str(data_root), "--run-dir", str(run_dir), "--log-every", "1000", "--no-report", *extra]


def sigterm_at_step(args, step=2):
    """Runs a project script (args, with --log-every 1) and sends it SIGTERM once it prints "step {step}/", as
    Slurm pre-empts a job; returns the CompletedProcess of what followed (text mode)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    for line in proc.stdout:
        if f"step {step}/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def apt_install(packages, installed):
    """Installs Debian packages for a test that needs the real component (installed() says when they are
    there); skips, naming why, where that cannot happen."""
    if installed():
        return
    names = " and ".join(packages)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{names} not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    try:
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            # A fresh machine has no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=300)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        pytest.skip(f"could not install {names} with apt-get: `{' '.join(exc.cmd)}` timed out")
    if result.returncode != 0 or not installed():
        pytest.skip(f"could not install {names} with apt-get: {result.stderr.strip()[-500:]}")


@pytest.fixture(scope="session")
def finished_run(synthetic_root, tmp_path_factory):
    """The folder of one finished tiny run (uninterrupted): the reference resumed and faulted runs must equal.
    Tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = run_script("train.py", *tiny_flags(synthetic_root, run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir
