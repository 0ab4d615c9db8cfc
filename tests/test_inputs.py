"""Inputs checked where they enter: flags, checkpoints (finite weights, config values), split manifests, metadata
rows, ingests that did not finish, weights.py's images; each refusal one line naming the row, key or file."""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import config
import distributed
import files
import predict
import prepare
import preload
import splits
from splits import Protocol
import train
import weights
import writes
from conftest import ROOT, run_script, tiny_flags
from labels import UserError, artefact_scheme
from test_data import write_dataset
from test_disks import parquet_shard


def error_lines(captured):
    return [line for line in captured.err.splitlines() if not line.startswith(("preload:", "note:"))]


@pytest.mark.parametrize("value", ["-1,-1,-1", "0,0,0", "0.2,nan,0.5"])
def test_head_weights_that_would_ascend_or_train_nothing_are_refused(value, capsys):
    assert train.main(["--heads", "hierarchical", f"--head-weights={value}", "--img-size", "64", "--dry-run"]) == 2
    assert error_lines(capsys.readouterr()) == [f"error: --head-weights {value}: each weight must be 0 or more and at "
                                                "least one above 0 (a negative one trains by ascending that head's "
                                                "loss), e.g. 0.2,0.3,0.5"]


def test_an_empty_data_flag_is_refused_not_taken_for_synthetic(capsys):
    for entry in (["--img-size", "64", "--dry-run"], ["--eval-only", "--checkpoint", "x.pt"]):
        assert train.main(["--data", "", *entry]) == 2
        assert error_lines(capsys.readouterr()) == ["error: --data '': empty (an unset variable in a job script?); "
                                                    "pass a dataset folder or 'synthetic'"]


def test_a_data_folder_that_is_not_a_dataset_is_refused_in_one_line_and_leaves_no_run_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    run_dir = tmp_path / "run"
    proc = run_script("train.py", *tiny_flags(tmp_path / "photos", run_dir))
    assert proc.returncode == 2 and [line for line in proc.stderr.splitlines() if not line.startswith("note:")] == [
        f"error: {tmp_path / 'photos' / 'images'}: folder not found; a dataset needs images/ and annotations/ "
        "with matching file names"], proc.stderr
    assert not run_dir.exists()


def test_a_hand_edited_manifest_is_refused_naming_the_fold(tmp_path):
    root = write_dataset(tmp_path / "ds", count=9)
    manifest = tmp_path / "m.json"
    splits.split_ids(root, Protocol("kfold", 3), 0, manifest)
    stored = json.loads(manifest.read_text())
    moved = stored["test"][1][0]
    stored["test"][1].remove(moved)
    stored["test"][0].append(moved)
    manifest.write_text(json.dumps(stored))
    with pytest.raises(UserError) as raised:
        splits.split_ids(root, Protocol("kfold", 3), 2, manifest)
    assert str(raised.value) == (f"{manifest}: its fold lists were edited (fold 0 test list: {moved} added); folds "
                                 "follow from the scheme, seed and fractions it records, so an edit would be "
                                 "silently ignored: undo it, or delete the file to re-split (custom folds are not "
                                 "supported)")


def poisoned(path, out, **config):
    """A copy of the checkpoint at path with one weight set to NaN (config values replaced by config)."""
    state = torch.load(path, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name].clone().fill_(float("nan"))
    state["config"] = dict(state["config"], **config)
    torch.save(state, out)
    return name


def test_a_checkpoint_with_nan_weights_is_refused_by_every_entry_point(synthetic_root, finished_run, tmp_path,
                                                                       capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    name = poisoned(finished_run / "best.pt", run_dir / "best.pt")
    poisoned(finished_run / "last.pt", run_dir / "last.pt")
    words = f"its weights are not finite (NaN or inf in {name})"
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    for entry in (lambda: train.main(["--eval-only", "--checkpoint", str(run_dir / "best.pt")]),
                  lambda: train.main(tiny_flags(synthetic_root, run_dir, "--resume")),
                  lambda: predict.main(["--checkpoint", str(run_dir / "best.pt"), str(image), "--out",
                                        str(tmp_path / "maps")])):
        assert entry() == 2
        lines = error_lines(capsys.readouterr())
        assert len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "maps" / "photo_mask.png").exists()


@pytest.mark.parametrize("key, value, need", [("img_size", "64", "a positive whole number of pixels"),
                                              ("work_size", -5, "0 or a whole number of pixels"),
                                              ("decoder", "segformer", "unet or upernet"),
                                              ("fold", 1.5, "0 or more")])
def test_checkpoint_config_values_of_the_wrong_type_or_range_are_refused_naming_the_key(finished_run, tmp_path,
                                                                                          key, value, need, capsys):
    state = torch.load(finished_run / "best.pt", weights_only=True)
    state["config"][key] = value
    path, image = tmp_path / "edited.pt", tmp_path / "photo.png"
    torch.save(state, path)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    assert predict.main(["--checkpoint", str(path), str(image), "--out", str(tmp_path / "o")]) == 2
    assert error_lines(capsys.readouterr()) == [
        f"error: --checkpoint {path}: its config has {key} = {value!r}, which must be {need}; the file was edited or "
        "not written by train.py: pass an unmodified best.pt or last.pt"]


def test_metadata_duplicates_with_other_values_are_refused_and_an_excel_export_is_read(tmp_path):
    root = write_dataset(tmp_path / "ds", count=3)
    rows = list(csv.reader(open(root / "metadata.csv")))
    excel = "\ufeff" + "".join(",".join(row) + "\r\n" for row in rows)
    (root / "metadata.csv").write_bytes(excel.encode("utf-8"))
    assert files.read_metadata(root) == {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    (root / "metadata.csv").write_text("".join(",".join(row) + "\n" for row in rows + [rows[1]]))
    assert len(files.read_metadata(root)) == 3, "a row repeated word for word says nothing new"
    other = [rows[1][0], "Glass", rows[1][2]]
    (root / "metadata.csv").write_text("".join(",".join(row) + "\n" for row in rows + [other]))
    with pytest.raises(UserError) as raised:
        files.read_metadata(root)
    assert str(raised.value) == (f"{root / 'metadata.csv'}: id {rows[1][0]} is on lines 2 and 5 with different "
                                 f"material ({rows[1][1]!r} vs 'Glass'); keep one row per image")


def test_an_ingest_that_failed_half_way_leaves_a_folder_every_reader_refuses(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    shards = parquet_shard(tmp_path / "shards", 3, side=8)
    table = pq.read_table(shards / "shard.parquet")
    ids = table.column("id").to_pylist()
    ids[2] = "../escape"
    pq.write_table(table.set_column(0, "id", pa.array(ids)), shards / "shard.parquet")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="row 3"):
        prepare.prepare([shards], out)
    assert len(list((out / "images").iterdir())) == 2
    for reader in (prepare.check, files.list_samples):
        with pytest.raises(UserError, match=rf"{out}: an ingest into it did not finish"):
            reader(out)
    # --overwrite replaces it; a sub-folder someone keeps in images/ is left alone and named.
    (out / "images" / "notes").mkdir()
    prepare.prepare([parquet_shard(tmp_path / "good", 2, side=8)], out, overwrite=True)
    assert "ok: 2 image/mask pairs" in prepare.check(out) and (out / "images" / "notes").is_dir()


def test_summary_refuses_one_folder_given_twice_and_names_a_broken_config(finished_run, tmp_path, capsys):
    assert train.main(["--summary", str(finished_run), f"{finished_run}/"]) == 2
    assert error_lines(capsys.readouterr()) == [f"error: --summary: {finished_run}/ is given twice (also as "
                                                f"{finished_run}); a fold counts once"]
    broken = tmp_path / "broken"
    shutil.copytree(finished_run, broken)
    (broken / "config.json").write_text('{"encoder": ')
    assert train.main(["--summary", str(broken)]) == 2
    lines = error_lines(capsys.readouterr())
    assert len(lines) == 1 and lines[0].startswith(f"error: --summary: {broken / 'config.json'}: unreadable")


def test_data_py_has_no_command_line_and_says_so():
    done = run_script("data.py", "prepare")
    assert done.returncode == 2 and done.stderr.startswith("error: data.py has no command line; ingest ARTeFACT with "
                                                           "`python prepare.py ingest")
    requirements = (ROOT / "requirements.txt").read_text()
    assert "data.py" not in requirements and "prepare.py ingest" in requirements


def test_report_help_answers_before_torch_or_matplotlib_load():
    done = subprocess.run([sys.executable, "-X", "importtime", "report.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "run folders of train.py" in done.stdout, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "matplotlib", "numpy"}


def test_weights_py_counts_a_folds_training_images_at_the_working_scale_like_train_py(synthetic_root, finished_run,
                                                                                      tmp_path, capsys):
    out = tmp_path / "fold0.json"
    assert weights.main(["--data", str(synthetic_root), "--img-size", "64", "--fold", "0", "--run-dir",
                         str(finished_run), "--out", str(out)]) == 0
    assert "counted the 14 training images of fold 0" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["counts"] == json.loads((finished_run / "class_weights.json").read_text())["counts"]
    assert written["images"]["fold"] == 0 and written["images"]["select"] == "inner"
    # At another working scale the counts are the preload's, which training reads its weights from.
    assert weights.main(["--data", str(synthetic_root), "--img-size", "64", "--work-size", "64", "--out",
                         str(tmp_path / "all.json")]) == 0
    rows = preload.preload(files.list_samples(synthetic_root),
                           preload.RowFormat(64, artefact_scheme(), work_size=64), mode="disk")
    assert json.loads((tmp_path / "all.json").read_text())["counts"] == rows.counts[:, :16].sum(0).tolist()
    assert json.loads((tmp_path / "all.json").read_text())["images"] == "all"


NAMES = artefact_scheme().names


def test_a_weights_file_of_another_fold_is_refused_and_one_of_all_images_is_noted(tmp_path):
    cfg = {"split": "kfold", "fold": 0, "folds": 3, "seed": 42, "inner_frac": 0.15, "select": "inner"}
    path = tmp_path / "w.json"
    counts = np.arange(1, 17)
    weights.save_weights(path, "inverse", counts, weights.compute_weights(counts, "inverse"), 36.0, NAMES,
                         dict(cfg, fold=1))
    with pytest.raises(UserError, match=r"counted on other training images \(--fold 1 \(this run: 0\)\)"):
        weights.check_images(path, cfg)
    weights.save_weights(path, "inverse", counts, weights.compute_weights(counts, "inverse"), 36.0, NAMES, dict(cfg))
    assert weights.check_images(path, cfg) is None
    weights.save_weights(path, "inverse", counts, weights.compute_weights(counts, "inverse"), 36.0, NAMES)
    assert "counted on every image, the test fold's included" in weights.check_images(path, cfg)


def test_weights_py_out_under_a_file_is_one_line(synthetic_root, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert weights.main(["--data", str(synthetic_root), "--out", str(tmp_path / "file" / "w.json")]) == 2
    lines = error_lines(capsys.readouterr())
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {tmp_path / 'file' / 'w.json'}: cannot create "
                                                   f"{tmp_path / 'file'}")


def test_sizes_read_in_the_unit_that_shows_them():
    assert [writes.size_text(n) for n in (3 * 2**30, 40 * 2**20, 300 * 2**10)] == ["3.00 GiB", "40.0 MiB", "300 KiB"]


STUCK_RANK = """
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
import distributed
rank, world, *_ = distributed.setup_distributed(3, "cpu:gloo")
preemption = distributed.Preemption()  # the default group is not plain gloo: the poll gets a gloo group of its own
if rank == 1:
    time.sleep(6)  # never polls
else:
    try:
        preemption.poll()
        preemption.poll()  # waits for rank 1's half of the first all-reduce
        outcome = "returned"
    except RuntimeError as exc:
        outcome = [type(exc).__name__, str(exc)]
    open(sys.argv[1], "w").write(json.dumps(outcome))
    os._exit(0)
"""


def test_the_preemption_polls_own_group_fails_after_dist_timeout_not_torchs_30_minutes(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RANK)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "outcome.json"), str(ROOT)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    kind, message = json.loads((tmp_path / "outcome.json").read_text())
    assert kind == "PeerLost" and message.startswith("a collective did not complete (Timed out waiting 3000ms")
    assert "another rank died, was stopped or hung longer than --dist-timeout" in message


DYING_RANK = """
import os, sys
sys.path.insert(0, sys.argv[1])
import train
step, calls = train.train_step, []


def dies_in_its_second_step(*args):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        os._exit(9)  # as a node that fails: no message, no goodbye to the process group
    return step(*args)


train.train_step = dies_in_its_second_step
sys.exit(train.main(sys.argv[2:]))
"""


def test_a_rank_dying_inside_ddps_gradient_all_reduce_ends_the_survivor_in_one_line(synthetic_root, tmp_path):
    # Two ranks started as srun starts them (no torchrun to stop the survivor): rank 0 meets the loss inside
    # DistributedDataParallel's own all-reduce in the backward, not in a collective of distributed.py.
    script = tmp_path / "dying.py"
    script.write_text(DYING_RANK)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = tiny_flags(synthetic_root, tmp_path / "run", "--log-every", "1", "--dist-timeout", "60")
    ranks = [subprocess.Popen([sys.executable, str(script), str(ROOT), *map(str, flags)], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       OMP_NUM_THREADS="1"))
             for r in (0, 1)]
    (out, err), _ = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 9]
    assert "step 1/" in out and "step 2/" not in out, "rank 0 stopped in the step rank 1 died in"
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error (rank 0): a collective did not complete (") and "Connection" in last, last
    assert last.endswith("another rank died, was stopped or hung longer than --dist-timeout; its own log says "
                         f"why; finished epochs are in {tmp_path / 'run' / 'last.pt'}, rerun with --resume")


def test_only_a_collectives_failure_is_called_a_lost_peer():
    reset = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                         "[127.0.0.1]:21386: Connection reset by peer. This is typically caused by a remote worker")
    assert str(distributed.as_peer_lost(reset)).startswith(
        "a collective did not complete (Read error [127.0.0.1]:21386: Connection reset by peer. This is")
    nccl = torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1935, remote process exited")
    assert isinstance(distributed.as_peer_lost(nccl), distributed.PeerLost)
    assert distributed.as_peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x8)")) is None
    assert distributed.as_peer_lost(ValueError("[../third_party/gloo/gloo/x.cc:1] not a RuntimeError")) is None


def test_a_lost_peer_ends_each_surviving_rank_in_one_line_naming_what_is_kept(synthetic_root, tmp_path, capsys):
    def lost(*_):
        raise distributed.PeerLost("a collective did not complete (Timed out waiting 3000ms for recv operation "
                                   "to complete): another rank died")
    args = config.parse_args(tiny_flags(synthetic_root, tmp_path / "run"))
    assert train.run_main(args, lost) == 1
    assert error_lines(capsys.readouterr()) == [
        "error (rank 0): a collective did not complete (Timed out waiting 3000ms for recv operation to complete): "
        f"another rank died; finished epochs are in {tmp_path / 'run' / 'last.pt'}, rerun with --resume"]
