"""Shared fixtures: the repository root on sys.path and one small synthetic damage set per test session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tests share two cores; one thread per process keeps multi-process tests from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from synthetic import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "set", count=24, size=96, seed=42)


def run_script(*args, env=None, timeout=300, cwd=None):
    """Runs a project script as a user would; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, PYTHONHASHSEED="0", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
