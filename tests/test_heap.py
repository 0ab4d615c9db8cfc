"""The host heap of CPU training: freed memory is kept, so the steps after the first few fault in no fresh pages.

Each check runs in a process of its own: the setting is process-wide and would change this one's memory."""
import json

from conftest import ROOT, run_script, tiny_flags

# A step's worth of blocks, allocated together and freed at its end, as a training step's activations are;
# the largest (48 MiB) is above glibc's largest threshold for mapping a block on its own (32 MiB), so without
# the setting it is mapped, faulted in page by page and unmapped again every step.
STEPS = """
import json, resource, sys
import torch
from heap import keep_freed_memory
kept = keep_freed_memory(torch.device("cpu")) if sys.argv[1] == "kept" else None
def step():
    blocks = [torch.empty(mib << 18).fill_(1.0) for mib in (48, 4, 24, 1, 12)]
    return sum(len(block) for block in blocks)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""

# train.py as a user runs it, with each train_step's minor page faults recorded.
COUNTED_TRAIN = """
import json, resource, sys
import train
steps, step = [], train.train_step
def counted(*args, **kwargs):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss = step(*args, **kwargs)
    steps.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return loss
train.train_step = counted
code = train.main(sys.argv[1:])
print("FAULTS " + json.dumps(steps))
sys.exit(code)
"""


def step_faults(mode, tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(STEPS)
    done = run_script(script, mode, env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_step_after_the_first_few_reuses_the_freed_blocks_without_faulting_pages_in(tmp_path):
    default, kept = step_faults("default", tmp_path), step_faults("kept", tmp_path)
    assert kept["kept"] is True
    # glibc places blocks freed mid-heap by where its aligned requests fit, so the heap settles in a few steps.
    settled, unset = sum(kept["faults"][6:]), sum(default["faults"][6:])
    # 48 MiB is 12,288 pages of 4 KiB a step (24 where the kernel backs the block with huge pages).
    assert unset >= 6 * 24, default
    assert settled * 20 <= unset, (kept, default)


def test_off_glibc_nothing_is_changed(monkeypatch):
    import heap
    import torch
    monkeypatch.setattr(heap.os, "confstr", lambda name: None)
    assert heap.keep_freed_memory(torch.device("cpu")) is False


def test_a_gpu_run_leaves_glibc_as_it_is(monkeypatch):
    import heap
    import torch

    def refuse(*args):
        raise AssertionError("glibc was asked on a GPU device")
    monkeypatch.setattr(heap.os, "confstr", refuse)
    assert heap.keep_freed_memory(torch.device("cuda")) is False


def test_train_py_steps_after_the_first_fault_in_almost_no_pages(synthetic_root, tmp_path):
    script = tmp_path / "counted_train.py"
    script.write_text(COUNTED_TRAIN)
    done = run_script(script, *tiny_flags(synthetic_root, tmp_path / "run", "--epochs", "3"),
                      env={"PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    faults = json.loads(done.stdout.split("FAULTS ", 1)[1].splitlines()[0])
    assert len(faults) >= 9, faults
    # The first two steps map the heap the steps share; the later ones together fault in less than a tenth of
    # the first one's pages (without the setting each of them faults about a quarter of them in again).
    assert sum(faults[2:]) * 10 <= faults[0], faults
