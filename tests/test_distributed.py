"""The GPU path's rules, checked on the CPU: collectives only through distributed.py, SyncBatchNorm that keeps
the network's function, a batch search that cannot mis-pair collectives, precision and TF32 as documented, one
step's loss and gradients equal on any number of ranks and micro-batches."""
import ast
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
import config
import distributed
import model
import step
import train
from labels import UserError


def torchrun(*args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True, capture_output=True,
                          timeout=timeout)


def test_no_file_but_distributed_py_uses_torch_distributed():
    # NCCL refuses host tensors that gloo on a CPU accepts; distributed.py's helpers move every tensor to the
    # group's device, so a collective called anywhere else is the bug class the CPU tests cannot see.
    offenders = []
    for path in sorted(ROOT.glob("*.py")):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("torch.distributed")]
    assert offenders == []


@pytest.mark.parametrize("backend, device, expected", [
    ("nccl", "cuda:1", "cuda:1"), ("gloo", "cpu", "cpu"), ("gloo", "cuda:0", "cuda:0"),
    ("cuda:gloo", "cuda:0", "cuda:0"), ("cpu:gloo,cuda:nccl", "cuda:0", "cuda:0"), ("cpu:gloo", "cuda:0", "cpu")])
def test_collective_tensors_go_to_a_device_the_backend_serves(backend, device, expected):
    assert distributed.comm_device(backend, torch.device(device)) == torch.device(expected)


def test_a_cuda_only_backend_on_a_cpu_rank_is_refused():
    with pytest.raises(UserError, match="--dist-backend cuda:gloo: serves only cuda"):
        distributed.comm_device("cuda:gloo", torch.device("cpu"))


@pytest.mark.parametrize("visible, local_rank, ordinal", [(1, 1, 0), (2, 1, 1), (4, 5, 1)])
def test_a_rank_uses_its_gpu_among_those_it_can_see(monkeypatch, visible, local_rank, ordinal):
    # srun with one GPU per task shows each task its GPU as device 0, whatever its SLURM_LOCALID.
    for name, value in (("is_available", lambda: True), ("device_count", lambda: visible),
                        ("set_device", lambda device: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    env = {"SLURM_NTASKS": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(local_rank)}
    monkeypatch.setattr(os, "environ", env)
    assert distributed.setup_distributed(10)[4] == torch.device("cuda", ordinal)


def bn_encoder_model(encoder):
    torch.manual_seed(0)
    return model.build_model(encoder, 16, decoder="unet", img_size=64, norm="bn").eval()


# Every encoder family the README lists, with --norm bn (BatchNorm in the decoder too); MaxViT and CoAtNet carry
# timm's BatchNormAct2d, whose fused activation torch's own converter drops.
FUSED_BN_ACT = ("maxvit_tiny", "coatnet_0")


@pytest.mark.parametrize("encoder", ["resnet10t", "convnext_tiny", "mit_b0", "swin_tiny", *FUSED_BN_ACT])
def test_syncbn_conversion_keeps_the_function_and_the_checkpoint_keys(encoder):
    plain = bn_encoder_model(encoder)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = plain(x)
        synced = model.sync_batchnorm(copy.deepcopy(plain)).eval()
        assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == \
            sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) >= 10, "every BatchNorm converted"
        torch.testing.assert_close(synced(x), expected, rtol=0, atol=0)
        assert list(synced.state_dict()) == list(plain.state_dict())
        # What --eval-only and predict.py do: the trained (converted) weights into the unconverted network.
        reloaded = bn_encoder_model(encoder)
        reloaded.load_state_dict(synced.state_dict())
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
        if encoder in FUSED_BN_ACT:
            # The comparison can fail: torch's own converter drops timm's fused activations.
            dropped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).eval()
            assert (dropped(x) - expected).abs().max() > 1e-3


def test_auto_precision_needs_bf16_tensor_cores_not_emulation(monkeypatch):
    gpus = {"V100": (False, (7, 0)), "T4": (False, (7, 5)), "A100": (True, (8, 0)), "P100": (False, (6, 0))}
    chosen = {}
    for name, (native, capability) in gpus.items():
        # torch counts emulated bf16 as supported unless including_emulation=False (True on a V100).
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            n or including_emulation)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        chosen[name] = config.auto_precision(torch.device("cuda"))
    assert chosen == {"V100": "fp16", "T4": "fp16", "A100": "bf16", "P100": "fp32"}
    assert config.auto_precision(torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("bf16", True), ("fp16", True)])
def test_fp32_is_strict_float32_and_amp_runs_keep_tf32_for_their_float32_parts(precision, tf32):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        train.set_backends({"precision": precision}, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_batch_search_agrees_once_on_the_smallest_rank_and_caps_at_the_training_images(tmp_path):
    done = torchrun(ROOT / "tests" / "two_ranks.py", "autobatch", tmp_path)
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"autobatch-{r}.json").read_text()) for r in range(2)]
    # Rank 0 runs out of memory above 33 images, rank 1 above 63: both take 33, less 10 % headroom, in 8s.
    assert [r["found"] for r in ranks] == [2 * 24, 2 * 24]
    assert ranks[0]["probed"][0] == 2 and ranks[0]["probed"] != ranks[1]["probed"], "probes differ per rank"
    assert [r["calls"]["all_reduce"] for r in ranks] == [1, 1] and sum(ranks[0]["calls"].values()) == 1
    assert autobatch_cap() == 6


def autobatch_cap():
    import autobatch
    return autobatch.largest_fitting(lambda batch: None, cap=6)


def test_the_real_probe_step_runs_no_collective(tmp_path):
    done = torchrun(ROOT / "tests" / "two_ranks.py", "probe", tmp_path)
    assert done.returncode == 0, done.stderr
    for rank in range(2):
        result = json.loads((tmp_path / f"probe-{rank}.json").read_text())
        assert sum(result["probe_calls"].values()) == 0
        # Capped at 5 training images per rank, the agreement is the one collective of the search.
        assert result["found"] == 2 * 4 and result["calls"]["all_reduce"] == 1


def test_batch_auto_with_micro_batch_is_refused_in_one_line():
    with pytest.raises(UserError, match="--micro-batch 4 with --batch-size auto"):
        config.resolve_config(config.parse_args(["--batch-size", "auto", "--micro-batch", "4", "--img-size", "64"]),
                              1, torch.device("cpu"))


@pytest.mark.parametrize("loss", ["dicefocal", "focal"])
def test_one_step_loss_and_gradients_equal_on_two_ranks_and_with_micro_batches(synthetic_root, tmp_path, loss):
    # The claim the README makes: the global batch's loss and gradient, whatever the split (no BatchNorm here:
    # --norm gn and MiT's LayerNorm; with BatchNorm each rank or micro-batch normalises with its own statistics).
    done = torchrun(ROOT / "tests" / "two_ranks.py", f"step-{loss}", tmp_path, synthetic_root)
    assert done.returncode == 0, done.stderr
    ranks = [torch.load(tmp_path / f"step-{loss}-{r}.pt", weights_only=True) for r in range(2)]
    one = ranks[0]["one"]
    for name, result in (("rank 0", ranks[0]["ddp"]), ("rank 1", ranks[1]["ddp"]), ("micro", ranks[0]["micro"])):
        assert result["loss"] == pytest.approx(one["loss"], rel=2e-6), name
        assert result["grads"].keys() == one["grads"].keys()
        for key, grad in one["grads"].items():
            scale = float(grad.abs().max()) + 1e-12
            np.testing.assert_allclose(result["grads"][key].numpy() / scale, grad.numpy() / scale, atol=2e-6,
                                       err_msg=f"{name} {key}")


def test_the_weight_ema_stays_identical_on_every_rank_without_a_collective(synthetic_root, tmp_path):
    # Every rank applies the same all-reduced step, so the same EMA update keeps the averages bit-identical.
    done = torchrun(ROOT / "tests" / "two_ranks.py", "ema", tmp_path, synthetic_root)
    assert done.returncode == 0, done.stderr
    ranks = [torch.load(tmp_path / f"ema-{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["ema"].keys() == ranks[1]["ema"].keys()
    for key, averaged in ranks[0]["ema"].items():
        assert torch.equal(averaged, ranks[1]["ema"][key]), key
    assert any(not torch.equal(v, ranks[0]["initial"][k]) for k, v in ranks[0]["ema"].items()), "the EMA moved"


def test_compile_wraps_ddp_so_the_all_reduce_can_overlap_the_backward(tmp_path):
    cfg = config.resolve_config(config.parse_args(["--encoder", "resnet10t", "--img-size", "64", "--batch-size", "2",
                                                   "--compile"]), 1, torch.device("cpu"))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        network = step.build_network(cfg, torch.device("cpu"), 1)
        parts = step.build_training(cfg, network, 2, torch.device("cpu"), 10)
    finally:
        distributed.teardown()
    assert isinstance(parts.model._orig_mod, torch.nn.parallel.DistributedDataParallel)
    assert parts.model._orig_mod.module is parts.raw_model


def test_resuming_with_another_precision_or_any_training_flag_names_each_change():
    from checkpoint import resume_changes
    trained = {"precision": "bf16", "base_lr": 1e-3, "lr": 3e-4, "loss": "dicefocal", "norm": "bn", "micro_batch": 4,
               "world_size": 2, "log_every": 20}
    now = dict(trained, precision="fp16", base_lr=2e-3, lr=6e-4, norm="gn", micro_batch=2, world_size=4, log_every=5)
    assert resume_changes(trained, now) == ["--lr 0.001 -> 0.002", "--norm bn -> gn", "--precision bf16 -> fp16"]
