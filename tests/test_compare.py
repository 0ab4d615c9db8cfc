"""compare.py and grid.py as a researcher relies on them: a tiny grid (2 encoders x 2 folds, synthetic data, CPU)
run by grid.py, and every number of its comparison recomputed here from the runs' own files."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

import compare
import train
from conftest import module_folder, run_script
from files import list_samples, load_working, read_metadata
from grid import main as grid_main
from labels import artefact_scheme, scheme_to_dict
from metrics import iou_report, run_names
from runs import read_per_image, write_per_image
from checkpoint import load_checkpoint, model_from_checkpoint
from tiles import Tiling, predict_image

ENCODERS = ("resnet10t", "mit_b0")
FOLDS = 2
NAMES = list(artefact_scheme().names)
# Two epochs at this LR leave the two encoders predicting different classes, image by image.
TINY = ["--lr", "0.3", "--work-size", "48", "--img-size", "32", "--batch-size", "4", "--no-report", "--log-every",
        "1000"]


@pytest.fixture(scope="module")
def tiny_set(request, tmp_path_factory):
    """12 synthetic images of 64 px: 6 test images per fold, the fewest that still hold several materials."""
    from synthetic import make_synthetic
    with module_folder(request, tmp_path_factory, "tiny") as base:
        yield make_synthetic(base / "set", count=12, size=64, seed=42)


@pytest.fixture(scope="module")
def grid(request, tmp_path_factory, tiny_set):
    """The grid's folder, once per module: 2 encoders x 2 folds, each fold also scored at full resolution."""
    with module_folder(request, tmp_path_factory, "grid") as base:
        grid_dir = base / "grid"
        done = run_script("grid.py", "--grid-dir", grid_dir, "--full-res", "--encoder", "|".join(ENCODERS),
                          "--folds", FOLDS, "--data", tiny_set, *TINY, "--epochs", "2", env={"OMP_NUM_THREADS": "1"},
                          timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield grid_dir, done


def run_dirs(grid_dir):
    return [grid_dir / encoder / f"fold{k}" for encoder in ENCODERS for k in range(FOLDS)]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scored(run_dir):
    return next(r for r in records(run_dir) if "test" in r)["test"]


def mean_std(values):
    return np.mean(values), np.std(values, ddof=1), np.std(values, ddof=0)


def test_the_grid_trains_every_configuration_and_fold_then_writes_the_comparison(grid):
    grid_dir, done = grid
    for run_dir in run_dirs(grid_dir):
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["encoder"], config["fold"], config["folds"]) == (run_dir.parent.name, int(run_dir.name[-1]), 2)
        for name in ("confusion_per_image.npz", "run.json", "eval-test-fullres.json",
                     "eval-test-fullres_per_image.npz"):
            assert (run_dir / name).is_file(), f"{run_dir / name}"
    out = grid_dir / "comparison"
    for name in ("comparison.md", "comparison.csv", "comparison.tex", "comparison.json", "comparison.png",
                 "comparison-classes.tex", "comparison-pairs.csv"):
        assert (out / name).is_file(), name
    assert (out / "comparison.md").read_text() in done.stdout, "the Markdown table is printed too"


def test_the_chart_reads_in_percent_like_its_bar_labels_and_tables(grid, tmp_path, monkeypatch):
    import matplotlib.figure
    table = json.loads((grid[0] / "comparison" / "comparison.json").read_text())
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    compare.chart(table, tmp_path / "chart.png")
    top, bottom = saved[0].axes
    for ax in (top, bottom):
        assert ax.get_ylabel().endswith("(%)")
        assert ax.yaxis.get_major_formatter()(0.5, 0) == "50%"
    best = max(row["miou"]["mean"] for row in table["rows"])
    labels = [text.get_text() for text in top.texts]
    assert f"{100 * best:.2f} %" in labels, "each bar is labelled with its mean in %"


def test_per_image_matrices_are_each_test_image_counted_once(grid, tiny_set):
    grid_dir, _ = grid
    scheme = artefact_scheme()
    samples = {s.id: s for s in list_samples(tiny_set)}
    for run_dir in run_dirs(grid_dir):
        ids, matrices = read_per_image(run_dir / "confusion_per_image.npz")
        fine = np.asarray(json.loads((run_dir / "confusion.json").read_text())["fine"])
        np.testing.assert_array_equal(matrices.sum(0), fine)
        assert iou_report(torch.from_numpy(matrices.sum(0)), NAMES, 0)["miou"] == scored(run_dir)["miou"]
        manifest = json.loads(next((run_dir.parent / "splits").glob("*.json")).read_text())
        assert sorted(ids) == sorted(manifest["test"][json.loads((run_dir / "config.json").read_text())["fold"]])
    # One image's matrix, recounted here from a prediction of best.pt at the working scale.
    run_dir = run_dirs(grid_dir)[0]
    ids, matrices = read_per_image(run_dir / "confusion_per_image.npz")
    checkpoint = load_checkpoint(run_dir / "best.pt")
    model = model_from_checkpoint(checkpoint, run_dir / "best.pt")
    image, mask = load_working(samples[ids[3]], 32, 48, scheme)
    labels = predict_image(model, image, Tiling(32, batch_size=checkpoint["config"]["micro_batch"])).astype(np.int64)
    valid = mask != scheme.ignore
    counted = np.zeros((len(NAMES), len(NAMES)), dtype=np.int64)
    np.add.at(counted, (mask[valid].astype(np.int64), labels[valid]), 1)
    np.testing.assert_array_equal(matrices[3], counted)


def test_every_number_of_the_table_is_recomputed_from_the_runs(grid):
    grid_dir, _ = grid
    table = json.loads((grid_dir / "comparison" / "comparison.json").read_text())
    assert table["keys"] == ["encoder"] and [r["label"] for r in table["rows"]] == [f"encoder={e}" for e in ENCODERS]
    csv_rows = list(csv.DictReader(open(grid_dir / "comparison" / "comparison.csv")))
    markdown = (grid_dir / "comparison" / "comparison.md").read_text()
    for row, csv_row, encoder in zip(table["rows"], csv_rows, ENCODERS):
        dirs = [grid_dir / encoder / f"fold{k}" for k in range(FOLDS)]
        tests = [scored(d) for d in dirs]
        miou, std_n1, std_n = mean_std([t["miou"] for t in tests])
        assert (row["miou"]["mean"], row["miou"]["std_n1"], row["miou"]["std_n"]) == pytest.approx((miou, std_n1, std_n))
        assert float(csv_row["test_miou_mean"]) == pytest.approx(miou)
        assert float(csv_row["test_miou_std_n1"]) == pytest.approx(std_n1)
        assert f"| {encoder} | 2 | {100 * miou:.2f} ± {100 * std_n1:.2f} [{100 * std_n:.2f}] |" in markdown
        assert row["binary_iou"]["mean"] == pytest.approx(np.mean([t["binary_iou"] for t in tests]))
        for name in NAMES:
            values = [t["iou"][name] for t in tests if t["iou"][name] is not None]
            assert row["iou"][name]["n"] == len(values)
            if values:
                assert row["iou"][name]["mean"] == pytest.approx(np.mean(values))
        for material, stats in row["by_material"].items():
            values = [t["by_material"][material]["miou"] for t in tests if material in t["by_material"]]
            assert (stats["mean"], stats["n"]) == (pytest.approx(np.mean(values)), len(values))
        fullres = [json.loads((d / "eval-test-fullres.json").read_text())["test"]["miou"] for d in dirs]
        assert row["fullres"]["miou"]["mean"] == pytest.approx(np.mean(fullres))
        assert row["folds"][0]["fullres_miou"] == pytest.approx(fullres[0])
        costs = [json.loads((d / "run.json").read_text()) for d in dirs]
        epochs = [[r for r in records(d) if "epoch" in r] for d in dirs]
        assert row["cost"]["params"] == costs[0]["params"] == sum(
            p.numel() for p in model_from_checkpoint(load_checkpoint(dirs[0] / "best.pt"), "").parameters())
        assert row["cost"]["train_img_s"] == pytest.approx(np.mean([np.median([r["img_s"] for r in e]) for e in epochs]))
        assert row["cost"]["wall_seconds_per_fold"] == pytest.approx(np.mean([c["wall_seconds"] for c in costs]))
        assert costs[0]["wall_seconds"] == pytest.approx(sum(r["epoch_time_s"] for r in epochs[0])
                                                         + costs[0]["test_seconds"])
        assert row["cost"]["gpu_hours"] is None and row["cost"]["devices"] == "1x cpu", "a CPU run has no GPU-hours"
    pair = table["pairs"][0]
    first, second = ([scored(grid_dir / encoder / f"fold{k}")["miou"] for k in range(FOLDS)] for encoder in ENCODERS)
    assert pair["per_fold"] == pytest.approx([a - b for a, b in zip(first, second)])
    assert pair["difference"] == pytest.approx(np.mean(first) - np.mean(second))
    tex = (grid_dir / "comparison" / "comparison.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex and "test mIoU \\%" in tex
    assert "--select inner" in markdown and "n-1" in markdown and "Working scale" in markdown


def brute_force_pair(rows_dirs, resamples, seed, level):
    """The documented bootstrap, image by image with iou_report: fold by fold, rng.integers(0, n, (resamples, n))
    draws each fold's images; a row's statistic is the mean over folds of the drawn images' pooled mIoU."""
    rng = np.random.default_rng(seed)
    per_image = [[read_per_image(d / "confusion_per_image.npz") for d in dirs] for dirs in rows_dirs]
    statistic = np.zeros((len(rows_dirs), resamples))
    for k in range(FOLDS):
        reference_ids = per_image[0][k][0]
        draws = rng.integers(0, len(reference_ids), size=(resamples, len(reference_ids)))
        for r, row in enumerate(per_image):
            ids, matrices = row[k]
            by_id = dict(zip(ids, matrices))
            for i, drawn in enumerate(draws):
                cm = sum(by_id[reference_ids[j]] for j in drawn)
                statistic[r, i] += iou_report(torch.from_numpy(cm), NAMES)["miou"] / FOLDS
    difference = statistic[0] - statistic[1]
    return np.quantile(difference, [(1 - level) / 2, (1 + level) / 2]), difference


def test_the_bootstrap_is_the_documented_one_reproducible_and_holds_the_observed_difference(grid, tmp_path):
    grid_dir, _ = grid
    dirs = [str(d) for d in run_dirs(grid_dir)]
    first = compare.compare(dirs, tmp_path / "a", resamples=200, seed=7)["pairs"][0]
    again = compare.compare(dirs, tmp_path / "b", resamples=200, seed=7)["pairs"][0]
    other = compare.compare(dirs, tmp_path / "c", resamples=200, seed=8)["pairs"][0]
    assert first == again and first["interval"] != other["interval"]
    interval, difference = brute_force_pair([run_dirs(grid_dir)[:2], run_dirs(grid_dir)[2:]], 200, 7, 0.95)
    assert first["interval"] == pytest.approx(list(interval), abs=1e-12)
    observed = first["difference"]
    assert first["flip_share"] == pytest.approx(np.mean(difference <= 0 if observed > 0 else difference >= 0))
    assert first["interval"][0] <= observed <= first["interval"][1]
    assert observed != 0, "the two encoders must predict differently for this test to say anything"


def copy_runs(grid_dir, tmp_path, *names):
    """Copies of grid runs (loss/foldK) without their checkpoints, which compare.py does not read."""
    out = []
    for name in names:
        target = tmp_path / name.replace("/", "-")
        shutil.copytree(grid_dir / name, target, ignore=shutil.ignore_patterns("*.pt"))
        out.append(target)
    return out


def one_line_error(paths, capsys):
    assert compare.main([*map(str, paths), "--resamples", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_rows_tested_on_other_images_or_missing_a_fold_are_refused(grid, tmp_path, capsys):
    grid_dir, _ = grid
    a0, a1, b0, b1 = copy_runs(grid_dir, tmp_path, "resnet10t/fold0", "resnet10t/fold1", "mit_b0/fold0",
                               "mit_b0/fold1")
    err = one_line_error([a0, a1, b0], capsys)
    assert "row 'encoder=mit_b0' has no run tested on the images of" in err and "fold1" in err
    # Fold 1 of mit_b0 without its first test image: not the same test images.
    ids, matrices = read_per_image(b1 / "confusion_per_image.npz")
    write_per_image(b1 / "confusion_per_image.npz", ids[1:], matrices[1:])
    confusion = json.loads((b1 / "confusion.json").read_text())
    (b1 / "confusion.json").write_text(json.dumps(dict(confusion, fine=matrices[1:].sum(0).tolist())))
    err = one_line_error([a0, a1, b0, b1], capsys)
    assert "were not tested on the same images" in err and str(b1) in err and "--seed" in err
    # The same fold twice in a row.
    twin = tmp_path / "resnet10t-fold0-again"
    shutil.copytree(a0, twin)
    err = one_line_error([a0, twin, a1], capsys)
    assert "one configuration tested on the same images" in err


def test_unfinished_stale_old_or_foreign_runs_are_refused_in_one_line(grid, tmp_path, capsys):
    grid_dir, _ = grid
    a0, a1 = copy_runs(grid_dir, tmp_path, "resnet10t/fold0", "resnet10t/fold1")
    (a1 / "confusion_per_image.npz").unlink()
    err = one_line_error([a0, a1], capsys)
    assert "no confusion_per_image.npz" in err and f"--eval-only --checkpoint {a1 / 'best.pt'}" in err
    (a1 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(a1) if "test" not in r))
    assert "has no test record" in one_line_error([a0, a1], capsys)
    ids, matrices = read_per_image(a0 / "confusion_per_image.npz")
    write_per_image(a0 / "confusion_per_image.npz", ids, matrices + np.eye(len(NAMES), dtype=np.int64))
    assert "does not add up" in one_line_error([a0], capsys)
    (tmp_path / "empty").mkdir()
    assert "no run folders" in one_line_error([tmp_path / "empty"], capsys)
    c0, b0 = copy_runs(grid_dir, tmp_path / "schemes", "resnet10t/fold0", "mit_b0/fold0")
    config = json.loads((b0 / "config.json").read_text())
    renamed = dict(scheme_to_dict(artefact_scheme()))
    renamed["classes"] = [dict(c, name="Mould") if c["id"] == 5 else c for c in renamed["classes"]]
    (b0 / "config.json").write_text(json.dumps(dict(config, classes=renamed)))
    assert "another label scheme" in one_line_error([c0, b0], capsys)


def test_runs_from_before_the_per_image_files_compare_after_an_eval_only(grid, tmp_path, capsys):
    """A run without confusion_per_image.npz is read from `train.py --eval-only`'s eval-test.json beside it."""
    grid_dir, _ = grid
    old = tmp_path / "old"
    shutil.copytree(grid_dir / "resnet10t" / "fold0", old)
    (old / "confusion_per_image.npz").unlink()
    assert train.main(["--eval-only", "--checkpoint", str(old / "best.pt")]) == 0, capsys.readouterr().err
    table = compare.compare([str(old)], tmp_path / "out", resamples=10)
    assert table["rows"][0]["folds"][0]["source"] == "eval-test.json"
    assert table["rows"][0]["miou"]["mean"] == pytest.approx(scored(old)["miou"])


def test_grid_list_runs_nothing_and_a_bad_flag_is_one_line(tmp_path, capsys):
    assert grid_main(["--list", "--grid-dir", str(tmp_path / "g"), "--encoder", "mit_b0|resnet10t",
                      "--class-weights", "none|inverse_sqrt_log_scaled", "--folds", "2", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("grid: 8 runs") and len(lines) == 10 and not (tmp_path / "g").exists()
    assert f"--class-weights none --folds 2 --epochs 1 --fold 1 --run-dir {tmp_path}/g/resnet10t-none/fold1" in out
    assert lines[-1].startswith("  python compare.py ") and lines[-1].endswith(f"--out {tmp_path}/g/comparison")
    assert grid_main(["--list", "--loss", "dice|dicefocl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'dicefocl'" in err


def test_leave_one_group_out_folds_are_named_by_their_group(tiny_set, tmp_path, capsys):
    materials = sorted({row["material"] for row in read_metadata(tiny_set).values()})
    assert train.main(["--split", "material", "--fold", "2", "--data", str(tiny_set), "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["held_out"] == f"material={materials[2]}" and config["run_dir"].endswith(f"material2-{materials[2]}")
    assert grid_main(["--list", "--split", "material", "--data", str(tiny_set), "--grid-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [f"{tmp_path}/fold{k}-{m}" in out for k, m in enumerate(materials)] == [True] * len(materials)
    assert train.main(["--split", "material", "--fold", "9", "--data", str(tiny_set), "--dry-run"]) == 2
    assert f"--split material has folds 0..{len(materials) - 1} ({', '.join(materials)})" in capsys.readouterr().err


def test_a_held_out_group_is_named_in_the_log_the_summary_and_the_comparison(tiny_set, tmp_path, capsys):
    materials = sorted({row["material"] for row in read_metadata(tiny_set).values()})
    run_dir = tmp_path / "material1"
    assert train.main(["--split", "material", "--fold", "1", "--select", "last", "--data", str(tiny_set),
                       "--run-dir", str(run_dir), "--encoder", "resnet10t", *TINY, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert f"test fold material={materials[1]}" in (run_dir / "train.log").read_text()
    assert train.main(["--summary", str(run_dir)]) == 0
    assert f"| metric | mean ± std | material1 (material={materials[1]}) |" in capsys.readouterr().out
    table = compare.compare([str(run_dir)], tmp_path / "out", resamples=10)
    assert table["rows"][0]["folds"][0]["name"] == f"fold1 (material={materials[1]})"
    assert f"fold1 (material={materials[1]}) (" in (tmp_path / "out" / "comparison.md").read_text()


def test_run_names_are_short_unique_and_file_safe(tmp_path):
    assert run_names([tmp_path / "a" / "fold0", tmp_path / "b" / "fold0"]) == ["a-fold0", "b-fold0"]
    assert run_names([tmp_path / "x" / "fold 1"]) == ["fold_1"]
