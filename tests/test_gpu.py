"""The GPU path on a real GPU (skipped without CUDA): `make gpu-check` runs this file on a machine with one GPU.

Each test runs the project's scripts as a user would and appends what it measured (card, img/s, peak memory, MFU,
seconds) as one JSON line to $GPU_CHECK_OUT (default gpu-check.jsonl in the repository), so the figures outlive
the terminal. Sized to finish in under 8 minutes on one recent GPU (H100/H200 class).

- bf16 training steps of MiT-B3 and ConvNeXt-T UNets at 384 px, with and without torch.compile (bench.py);
- a short training run on the GPU that ends with its test record (the collective after the last epoch),
  --eval-only and --eval-only --full-res on its checkpoint;
- predict.py on a 4000 x 3000 photograph;
- --batch-size auto: the search alone (uncapped) and inside train.py;
- two ranks on the one GPU under a process group with a CUDA-only backend (cuda:gloo), which refuses host
  tensors in collectives as NCCL does (NCCL itself refuses two ranks on one GPU);
- the training data path at 384 px, batch 32 (bench.py --loader): crops cut on the host vs on the GPU
  (--device-data), with and without scale and colour augmentation, against torchvision's PNG loader.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
OUT = Path(os.environ.get("GPU_CHECK_OUT", ROOT / "gpu-check.jsonl"))
# Small enough for a few minutes, large enough to run every branch: 48 synthetic images of 256 px.
DATA = ["--data", "synthetic", "--synthetic-count", "48", "--synthetic-size", "256"]


def record(check, **figures):
    line = {"check": check, "card": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    with open(OUT, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)


def script(*args, nproc=None, timeout=420):
    start = time.perf_counter()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    done = subprocess.run([*launcher, *map(str, args)], cwd=ROOT, text=True, capture_output=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, time.perf_counter() - start


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("encoder", ["mit_b3", "convnext_tiny"])
def test_bf16_training_step_at_384_px(tmp_path, encoder, compiled):
    out = tmp_path / "bench.json"
    done, seconds = script("bench.py", "--encoder", encoder, "--img-size", "384", "--precision", "bf16",
                           "--bench-steps", "10", "--bench-out", out, *(["--compile"] if compiled else []))
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["device"] != "cpu" and row["precision"] == "bf16" and row["train_img_s"] > 0
    record(f"bench {encoder} 384 px bf16{' compile' if compiled else ''}", batch=row["batch"],
           train_img_s=round(row["train_img_s"], 1), infer_img_s=round(row["infer_img_s"], 1),
           peak_mem_mb=round(row["peak_mem_mb"]), gflops_per_img=round(row["gflops"], 1),
           mfu=None if row["mfu"] is None else round(row["mfu"], 4), wall_s=round(seconds, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run on the GPU (mit_b0, 128 px crops), its test record written after the last epoch."""
    run_dir = tmp_path_factory.mktemp("gpu") / "run"
    done, seconds = script("train.py", "--encoder", "mit_b0", "--img-size", "128", "--work-size", "256",
                           "--batch-size", "8", "--epochs", "2", "--run-dir", run_dir, "--no-report", *DATA)
    tests = [m for m in metrics(run_dir) if "test" in m]
    assert len(tests) == 1 and (run_dir / "confusion.json").is_file()
    record("train mit_b0 2 epochs", precision=json.loads((run_dir / "config.json").read_text())["precision"],
           test_miou=round(tests[0]["test"]["miou"], 4), img_s=round(metrics(run_dir)[-2]["img_s"], 1),
           wall_s=round(seconds, 1))
    return run_dir


def test_eval_only_and_full_res_on_the_gpu_match_the_logged_test(trained):
    done, seconds = script("train.py", "--eval-only", "--checkpoint", trained / "best.pt")
    scored = json.loads(done.stdout[done.stdout.index("{"):])["test"]
    assert scored == [m for m in metrics(trained) if "test" in m][0]["test"]
    done, full_seconds = script("train.py", "--eval-only", "--full-res", "--checkpoint", trained / "best.pt")
    full = json.loads(done.stdout[done.stdout.index("{"):])
    assert full["full_res"] is True
    record("eval-only / full-res", working_scale_miou=round(scored["miou"], 4),
           full_res_miou=round(full["test"]["miou"], 4), eval_s=round(seconds, 1), full_res_s=round(full_seconds, 1))


def test_predict_a_12_megapixel_photograph(trained, tmp_path):
    rng = np.random.default_rng(0)
    photo = (rng.random((3000, 4000, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    done, seconds = script("predict.py", "--checkpoint", trained / "best.pt", tmp_path / "photo.png",
                           "--out", tmp_path / "maps")
    mask = np.asarray(Image.open(tmp_path / "maps" / "photo_mask.png"))
    assert mask.shape == (3000, 4000)
    record("predict 4000x3000", wall_s=round(seconds, 1))


def test_batch_size_auto_finds_a_batch_that_trains(tmp_path):
    sys.path.insert(0, str(ROOT))
    import autobatch
    import config
    import train
    device = torch.device("cuda", 0)
    cfg = config.resolve_config(config.parse_args(["--encoder", "mit_b3", "--img-size", "384"]), 1, device)
    train.set_backends(cfg, device)
    start = time.perf_counter()
    found = autobatch.find_batch_size(train.probe_step(cfg, device), device, 4096, 1)
    search_s = time.perf_counter() - start
    torch.cuda.empty_cache()
    assert found >= 2
    run_dir = tmp_path / "auto"
    done, seconds = script("train.py", "--encoder", "mit_b0", "--img-size", "128", "--work-size", "256",
                           "--batch-size", "auto", "--epochs", "1", "--run-dir", run_dir, "--no-report", *DATA)
    chosen = json.loads((run_dir / "config.json").read_text())["batch_size"]
    assert "--batch-size auto:" in done.stdout and 2 <= chosen
    record("batch-size auto", mit_b3_384_px_per_gpu=found, search_s=round(search_s, 1),
           mit_b0_128_px_capped_at_training_images=chosen, run_s=round(seconds, 1))


def test_two_ranks_on_one_gpu_under_a_cuda_only_backend(tmp_path):
    # cuda:gloo rejects host tensors in collectives as NCCL does; mit_b0 with --norm gn has no BatchNorm (gloo
    # cannot all-gather CUDA tensors, which SyncBatchNorm needs; that path needs two GPUs and NCCL).
    run_dir = tmp_path / "two"
    done, seconds = script("train.py", "--encoder", "mit_b0", "--norm", "gn", "--img-size", "128", "--work-size",
                           "256", "--batch-size", "8", "--epochs", "2", "--dist-backend", "cuda:gloo", "--run-dir",
                           run_dir, "--no-report", *DATA, nproc=2)
    tests = [m for m in metrics(run_dir) if "test" in m]
    assert len(tests) == 1 and "on cuda x2" in done.stdout
    record("2 ranks on one GPU, cuda:gloo", test_miou=round(tests[0]["test"]["miou"], 4), wall_s=round(seconds, 1))


def test_loader_on_the_gpu():
    done, seconds = script("bench.py", "--loader", "--img-size", "384", "--batch-size", "32")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("plain", "all"):
        assert row[f"cuda_host_cut_{name}_img_s"] > 0 and row[f"cuda_device_data_{name}_img_s"] > 0
    record("loader 384 px batch 32", **{k: v for k, v in row.items() if k.endswith("_img_s") or k.startswith("x_")},
           wall_s=round(seconds, 1))
