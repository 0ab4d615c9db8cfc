"""bench.sh as users rely on it: one command gives throughput tables on stdout and bench.json with every field."""
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT

FIELDS = {"encoder", "decoder", "img_size", "batch", "precision", "channels_last", "compile", "clip", "train_img_s",
          "infer_img_s", "peak_mem_mb", "params_m", "gflops", "mfu", "loader_img_s", "device"}


def bench(*args, cwd, python=sys.executable):
    env = dict(os.environ, PYTHON=str(python), CUDA_VISIBLE_DEVICES="")
    for name in ("ENCODERS", "DECODERS", "IMG_SIZE", "BATCH", "STEPS", "ABLATIONS", "ABLATE_ENCODER", "BENCH_OUT",
                 "REFERENCE", "ROUNDS", "COMPILED"):
        env.pop(name, None)
    return subprocess.run(["bash", str(ROOT / "bench.sh"), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


def test_quick_cpu_run_writes_bench_json_and_prints_both_tables(tmp_path):
    result = bench("--quick", "--encoders", "mit_b0", "--decoders", "unet", "--out", "bench.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    rows = [json.loads(line) for line in (tmp_path / "bench.json").read_text().splitlines()]
    assert [row["run"] for row in rows] == ["main", "clip", "no-channels-last"]
    main, clip, no_channels_last = rows
    for row in rows:
        assert FIELDS <= row.keys()
        assert (row["encoder"], row["decoder"], row["img_size"], row["batch"]) == ("mit_b0", "unet", 32, 2)
        assert row["device"] == "cpu" and row["mfu"] is None, "MFU needs a known peak; a CPU has none"
        for field in ("train_img_s", "infer_img_s", "peak_mem_mb", "gflops", "loader_img_s"):
            assert row[field] > 0, field
    assert (main["clip"], main["channels_last"], main["compile"]) == (None, True, False)
    assert clip["clip"] == 1.0 and clip["channels_last"] is True
    assert no_channels_last["channels_last"] is False and no_channels_last["clip"] is None

    from model import build_model
    params = sum(p.numel() for p in build_model("mit_b0", 16, img_size=32).parameters())
    assert abs(main["params_m"] - params / 1e6) < 1e-9

    lines = result.stdout.splitlines()
    assert any(line.startswith("| encoder | decoder | batch | precision | compile | train img/s |") for line in lines)
    assert f"| mit_b0 | unet | 2 | {main['precision']} | False | {main['train_img_s']:,.1f} |" in result.stdout
    ablation_rows = [line.split(" | ")[0] for line in lines if line.startswith(("| baseline", "| clip", "| no-"))]
    assert ablation_rows == ["| baseline", "| clip", "| no-channels-last"]



def test_reference_compile_compiles_the_references_step_and_inference_as_compile_does_ours(monkeypatch, capsys):
    smp = pytest.importorskip("segmentation_models_pytorch", reason="test-only oracle, requirements-dev.txt")
    import torch
    import bench as bench_py
    real_compile, compiled = torch.compile, []

    def eager_compile(model, **kwargs):
        # Dynamo traces the model as the real call does; the eager backend spares the minutes of C++ codegen.
        compiled.append(model)
        return real_compile(model, backend="eager")
    monkeypatch.setattr(torch, "compile", eager_compile)
    flags = ["--encoder", "resnet10t", "--img-size", "32", "--batch-size", "2", "--bench-steps", "2",
             "--bench-rounds", "1", "--reference"]
    assert bench_py.main(flags) == 0
    eager = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert compiled == [] and eager["ref_compile"] is False
    assert bench_py.main(flags + ["--compile", "--reference-compile"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    # Ours twice (the training step's model, then the raw model for inference), the reference once.
    assert [type(m) for m in compiled].count(smp.Unet) == 1 and len(compiled) == 3
    assert row["compile"] is True and row["ref_compile"] is True and row["ref_encoder"] == "tu-resnet10t"
    assert row["ref_params_m"] == eager["ref_params_m"], "compiling changes no parameter of the reference"
    assert abs(row["train_x_ref"] - row["train_img_s"] / row["ref_train_img_s"]) < 1e-9


def test_ours_and_the_reference_take_turns_going_first(monkeypatch, capsys):
    smp = pytest.importorskip("segmentation_models_pytorch", reason="test-only oracle, requirements-dev.txt")
    import torch
    import bench as bench_py
    import model
    timed, real_timed = [], bench_py._timed

    def logged(fn, steps, warmup, device):
        timed.append([])
        return real_timed(fn, steps, warmup, device)
    monkeypatch.setattr(bench_py, "_timed", logged)
    for cls, who in ((smp.Unet, "ref"), (model.SegmentationModel, "ours")):
        def forward(self, *args, _real=cls.forward, _who=who, **kwargs):
            if timed:
                timed[-1].append((_who, "train" if torch.is_grad_enabled() else "infer"))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", forward)
    flags = ["--encoder", "resnet10t", "--img-size", "32", "--batch-size", "2", "--bench-steps", "2",
             "--bench-rounds", "3", "--reference"]
    assert bench_py.main(flags) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["rounds"] == 3
    even = [("ours", "train"), ("ref", "train"), ("ours", "infer"), ("ref", "infer")]
    odd = [("ref", "train"), ("ours", "train"), ("ref", "infer"), ("ours", "infer")]
    assert [calls[0] for calls in timed] == even + odd + even
    assert all(len(set(calls)) == 1 for calls in timed[:-1]), "each timed call runs one model, one way"


def test_reference_and_compiled_rows_appear_with_ratios_when_smp_is_importable(tmp_path):
    try:
        import segmentation_models_pytorch  # noqa: F401  (test-only oracle, requirements-dev.txt)
    except ImportError as err:
        pytest.skip(f"segmentation_models_pytorch not importable ({err}); pip install -r requirements-dev.txt")
    # resnet10t: the encoder that compiles fastest here (56 s for both rows against 86 s for mit_b0).
    result = bench("--quick", "--reference", "--compiled", "--rounds", "2", "--encoders", "resnet10t", "--decoders",
                   "unet", "--ablations", "compile", "--out", "bench.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    row, compiled = [json.loads(line) for line in (tmp_path / "bench.json").read_text().splitlines()]
    assert (row["run"], row["compile"], compiled["run"], compiled["compile"]) == ("main", False, "compiled", True)
    for r in (row, compiled):
        assert r["ref_encoder"] == "tu-resnet10t" and r["rounds"] == 2
        for field in ("ref_train_img_s", "ref_infer_img_s", "train_x_ref", "infer_x_ref"):
            assert r[field] > 0, field
        assert abs(r["train_x_ref"] - r["train_img_s"] / r["ref_train_img_s"]) < 1e-9
        assert abs(r["infer_x_ref"] - r["infer_img_s"] / r["ref_infer_img_s"]) < 1e-9
        assert abs(r["ref_params_m"] - r["params_m"]) / r["params_m"] < 0.05, "the same encoder and decoder"
        assert r["params_m"] == row["params_m"], "compiling changes no parameter"
    assert f"| resnet10t | unet | 2 | {compiled['precision']} | True | {compiled['train_img_s']:,.1f} |" in result.stdout
    assert "compile ablation row skipped: every main row has its compiled row above" in result.stdout

    assert "train x ref | infer x ref |" in result.stdout
    assert (f"| resnet10t | unet | 2 | {row['precision']} | False | {row['train_img_s']:,.1f} |" in result.stdout
            and f"| {row['train_x_ref']:,.2f} | {row['infer_x_ref']:,.2f} |" in result.stdout)
    assert (f"| ref smp tu-resnet10t | smp Unet | 2 | {row['precision']} | False | {row['ref_train_img_s']:,.1f} |"
            in result.stdout)
    assert "native bf16" in result.stdout.splitlines()[0] and "intra-op threads" in result.stdout.splitlines()[0]


def test_the_loader_bench_reports_every_path_against_torchvisions_and_the_rows_shared_once(tmp_path):
    shm = Path("/dev/shm") / f"pytest-artdamage-{uuid.uuid4().hex[:8]}"
    shm.mkdir()
    try:
        done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--loader", "--loader-count", "4",
                               "--loader-source-size", "512", "--work-size", "512", "--img-size", "64",
                               "--batch-size", "2"], cwd=tmp_path, env=dict(os.environ, ARTDAMAGE_SHM_DIR=str(shm)),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert [p.name for p in shm.iterdir()] == ["artdamage.lock"], "the rows file is gone with its last user"
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert (result["images"], result["batch"], result["size"], result["work_size"]) == (4, 2, 64, 512)
    for path in ("plain", "scale", "colour", "blur", "all"):
        assert result[f"host_{path}_img_s"] > 0, path
    # Each ratio is the quotient of the rates beside it (each rounded to 0.1 img/s).
    plain, augmented = result["torchvision_png_img_s"], result["torchvision_aug_img_s"]
    assert result["x_torchvision"] == pytest.approx(result["host_plain_img_s"] / plain, abs=0.051 + 0.05 / plain)
    assert result["x_torchvision_aug"] == pytest.approx(result["host_all_img_s"] / augmented,
                                                        abs=0.051 + 0.05 / augmented)
    # Four 512 x 512 rows of RGB and mask bytes, 4 MiB, and their small statistics: mapped by two processes,
    # each is charged half and together they hold one copy.
    assert result["array_mib"] == 4.0
    assert result["pss_1proc_mib"] == pytest.approx(4.0, abs=0.1)
    assert all(1.9 <= pss <= 2.1 for pss in result["pss_2proc_mib"]), result["pss_2proc_mib"]
    assert result["pss_2proc_total_mib"] == pytest.approx(4.0, abs=0.1)


@pytest.mark.parametrize("flags, words", [
    (["--data", "missing"], "--data missing: folder not found; pass a dataset folder"),
    (["--work-size", "32", "--img-size", "64"], "--work-size 32: must be 0 (squash to --img-size) or at least"),
    (["--loader-count", "0"], "--loader-count 0: must be at least 1 (images)"),
    (["--loader-count", "2", "--batch-size", "4", "--img-size", "32", "--loader-source-size", "32",
      "--work-size", "32"], "--batch-size 4: more than the 2 images of --loader-count 2; lower it"),
    (["--batch-size", "auto"], "--batch-size auto: --loader takes a number of images"),
    (["--loader-source-size", "16", "--img-size", "64"], "--loader-source-size 16: must be at least --img-size 64"),
])
def test_the_loader_bench_refuses_what_it_cannot_measure_in_one_line(tmp_path, flags, words):
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--loader", *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and done.stdout == "" and len(lines) == 1 and lines[0].startswith(f"error: {words}"), \
        done.stderr


def test_a_failing_row_is_reported_and_sets_the_exit_status(tmp_path):
    result = bench("--quick", "--encoders", "not_a_model", "--ablations", "none", "--out", "bench.json",
                   cwd=tmp_path)
    assert result.returncode == 1
    assert "FAILED main not_a_model/unet" in result.stderr
    assert "error: --encoder not_a_model" in result.stderr, "train.py's own message must reach the user"
    assert (tmp_path / "bench.json").read_text() == ""


def test_missing_torch_stops_bench_with_one_line(tmp_path):
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    result = bench("--quick", cwd=tmp_path, python=no_torch)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: bench.sh: {no_torch} cannot import torch; run 'pip install -r requirements.txt' "
        "or set PYTHON=/path/to/venv/bin/python"]


@pytest.mark.parametrize("card,precision,peak", [("NVIDIA H200", "bf16", 989.0), ("NVIDIA H100 80GB HBM3", "fp16", 989.0),
                                                 ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A10", "bf16", 125.0),
                                                 ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H200 NVL", "bf16", 835.0),
                                                 ("NVIDIA H200", "fp32", None), ("Some Future GPU", "bf16", None)])
def test_mfu_peak_is_the_cards_dense_bf16_peak_and_none_for_fp32_or_unknown_cards(monkeypatch, card, precision, peak):
    import torch
    import bench as bench_module
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card)
    assert bench_module._peak_tflops(torch.device("cuda", 0), precision) == peak
    assert bench_module._peak_tflops(torch.device("cpu"), precision) is None


def test_mfu_is_three_forward_flops_per_image_over_the_given_peak(tmp_path):
    out = tmp_path / "row.json"
    done = subprocess.run([sys.executable, "bench.py", "--encoder", "mit_b0", "--img-size", "32", "--batch-size", "2",
                           "--bench-steps", "2", "--data", "synthetic", "--peak-tflops", "0.5", "--bench-out", str(out)],
                          cwd=ROOT, text=True, capture_output=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["mfu"] == pytest.approx(3 * row["gflops"] * 1e9 * row["train_img_s"] / 0.5e12, rel=1e-12)
