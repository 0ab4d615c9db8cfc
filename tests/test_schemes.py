"""Any dataset's label scheme end to end: a 5-class mural set (check, train, eval-only, predict, report: every
output names its classes), a binary crack set with its own palette and ignore id, checkpoints refused on another
scheme, masks outside the scheme refused, and ARTeFACT's default giving the same numbers as an explicit file."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, module_folder, run_script
from labels import artefact_scheme, scheme_from_dict, scheme_to_dict

MURAL = {"classes": [{"id": 0, "name": "clean", "colour": "#000000"},
                     {"id": 1, "name": "crack", "colour": "#E6194B"},
                     {"id": 2, "name": "flaking", "colour": "#3CB44B"},
                     {"id": 3, "name": "loss", "colour": "#FFE119"},
                     {"id": 4, "name": "stain", "colour": "#4363D8"}],
         "clean": 0, "ignore": 255, "ignore_colour": "#5A0007",
         "groups": [{"name": "clean", "ids": [0]}, {"name": "structural", "ids": [1, 2, 3]},
                    {"name": "surface", "ids": [4]}]}
MURAL_NAMES = [c["name"] for c in MURAL["classes"]]
# Crack / no crack, RGB masks in their own palette, the outside of the object 7 (grey in the masks).
BINARY = {"classes": [{"id": 0, "name": "no crack", "colour": "#000000"},
                      {"id": 1, "name": "crack", "colour": "#FFFFFF"}], "ignore": 7, "ignore_colour": "#808080"}
ARTEFACT_ONLY_NAMES = [n for n in artefact_scheme().names if n.lower() not in MURAL_NAMES]
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".md", ".log", ".html")


def paint_dataset(root, scheme, count=12, size=64, seed=0, rgb_masks=False):
    """count images of size px: a textured ground with a blob of one or two damage classes each (tinted by class,
    so a model can learn them), and the outside of the object (the scheme's ignore id) along one border."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    yy, xx = np.mgrid[0:size, 0:size]
    damage = list(scheme.damage_ids)
    for i in range(count):
        image = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
        mask = np.full((size, size), scheme.clean, np.uint8)
        for c in (damage[i % len(damage)], damage[(i * 3 + 1) % len(damage)]):
            cy, cx, r = rng.integers(12, size - 12, 2).tolist() + [int(rng.integers(5, 11))]
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            mask[blob] = c
            image[blob] = np.clip(np.array(scheme.colours[c]) * 0.6 + 40, 0, 255).astype(np.uint8)
        mask[:, :3 + i % 4] = scheme.ignore
        Image.fromarray(image).save(root / "images" / f"wall_{i:02d}.png")
        if rgb_masks:
            table = np.zeros((256, 3), np.uint8)
            table[:scheme.num_classes], table[scheme.ignore] = scheme.colours, scheme.ignore_colour
            Image.fromarray(table[mask]).save(root / "annotations" / f"wall_{i:02d}.png")
        else:
            Image.fromarray(mask).save(root / "annotations" / f"wall_{i:02d}.png")
    return root


def train_flags(data, run_dir, *extra):
    return ["train.py", "--encoder", "resnet10t", "--data", str(data), "--img-size", "64", "--work-size", "64",
            "--batch-size", "4", "--epochs", "2", "--norm", "gn", "--lr", "0.05", "--select", "last",
            "--run-dir", str(run_dir), "--log-every", "1000", *extra]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scores_of(run_dir):
    return next(r for r in records(run_dir) if "test" in r)["test"]


def evaluation_record(done):
    return json.loads(done.stdout[done.stdout.index("{"):])


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("preload:", "note:"))]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def mural(request, tmp_path_factory):
    """The 5-class set (classes.json in the folder), trained 2 epochs, with the outputs of check and training."""
    with module_folder(request, tmp_path_factory, "mural") as base:
        root = paint_dataset(base / "mural", scheme_from_dict(MURAL, "mural"))
        (root / "classes.json").write_text(json.dumps(MURAL, indent=1))
        check = run_script("prepare.py", "check", root)
        trained = run_script(*train_flags(root, base / "run"))
        assert trained.returncode == 0, trained.stderr
        yield root, base / "run", check, trained


def text_outputs(*folders):
    return {p: p.read_text() for folder in folders for p in folder.rglob("*") if p.suffix in TEXT_SUFFIXES}


def test_five_class_dataset_check_train_eval_predict_report_name_its_own_classes(mural, tmp_path):
    root, run, check, trained = mural
    assert check.returncode == 0, check.stderr
    assert "classes present: clean, crack, flaking, loss, stain" in check.stdout and "note:" not in check.stderr
    assert f"label scheme ({root / 'classes.json'}): 5 classes (0 clean, 1 crack" in check.stdout
    assert "label scheme: 5 classes" in trained.stdout and "note:" not in trained.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == scheme_to_dict(scheme_from_dict(MURAL, "x")) and config["num_classes"] == 5
    test = scores_of(run)
    assert list(test["iou"]) == MURAL_NAMES and set(test["absent"]) <= set(MURAL_NAMES)
    assert json.loads((run / "class_weights.json").read_text())["classes"] == MURAL_NAMES
    confusion = json.loads((run / "confusion.json").read_text())
    assert np.asarray(confusion["fine"]).shape == (5, 5)

    evaluated = run_script("train.py", "--eval-only", "--checkpoint", run / "best.pt")
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluation_record(evaluated)["test"] == test, "eval-only scores the checkpoint as training did"

    out = tmp_path / "maps"
    predicted = run_script("predict.py", "--checkpoint", run / "best.pt", root / "images" / "wall_01.png",
                           root / "images" / "wall_02.png", "--out", out, "--truth", root / "annotations")
    assert predicted.returncode == 0, predicted.stderr
    rows = list(csv.DictReader(open(out / "areas.csv")))
    assert len(rows) == 2 and [column[:-3] for column in rows[0] if column.endswith(" px")] == MURAL_NAMES
    scored = next(csv.reader(open(out / "scores.csv")))
    assert [column[:-4] for column in scored if column.endswith(" IoU")] == MURAL_NAMES
    palette = Image.open(out / "wall_01_mask.png").getpalette()
    # train.py leaves the small model.pt beside best.pt; it maps as best.pt does.
    from_model = run_script("predict.py", "--checkpoint", run / "model.pt", root / "images" / "wall_01.png", "--out",
                            tmp_path / "from_model")
    assert from_model.returncode == 0, from_model.stderr
    ours, scored = (np.asarray(Image.open(folder / "wall_01_mask.png")) for folder in (tmp_path / "from_model", out))
    inside = scored != scheme_from_dict(MURAL, "x").ignore  # the --truth run left its ignore id outside
    assert inside.mean() > 0.5
    np.testing.assert_array_equal(ours[inside], scored[inside])
    assert [tuple(palette[3 * k:3 * k + 3]) for k in range(5)] == list(scheme_from_dict(MURAL, "x").colours)

    report = (run / "report.md").read_text()
    for name in MURAL_NAMES:
        assert f"| {name} |" in report
    assert (run / "panels.png").is_file() and (run / "confusion.png").is_file()
    for path, text in text_outputs(run, out).items():
        for name in ARTEFACT_ONLY_NAMES:
            assert name not in text, f"{path} names ARTeFACT's class {name!r}"
    assert not any(name in trained.stdout + evaluated.stdout + predicted.stdout for name in ARTEFACT_ONLY_NAMES)


def test_a_checkpoint_is_refused_on_a_dataset_of_another_scheme_naming_the_difference(mural, tmp_path):
    root, run, _, _ = mural
    renamed = json.loads(json.dumps(MURAL))
    renamed["classes"][4]["name"] = "dirt"
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    refused = run_script("train.py", "--eval-only", "--checkpoint", run / "best.pt", "--classes",
                         tmp_path / "renamed.json")
    line = one_error_line(refused)
    assert f"--checkpoint {run / 'best.pt'}: trained with another label scheme than --classes" in line
    assert "class 4 'stain' vs 'dirt'" in line
    # --resume checks the scheme like every other flag that decides what the weights mean.
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    resumed = run_script(*train_flags(root, copy, "--resume", "--classes", tmp_path / "renamed.json"))
    line = one_error_line(resumed)
    assert line.startswith(f"error: --resume: {copy / 'last.pt'} was trained with other settings (label scheme: "
                           f"class 4 'stain' vs 'dirt', checkpoint vs --classes {tmp_path / 'renamed.json'})")


def test_masks_outside_the_scheme_stop_training_naming_the_file_and_ids(tmp_path):
    root = paint_dataset(tmp_path / "mural", scheme_from_dict(MURAL, "mural"), count=6)
    (root / "classes.json").write_text(json.dumps(MURAL))
    mask = np.asarray(Image.open(root / "annotations" / "wall_03.png")).copy()
    mask[20, 20:23] = (5, 9, 16)
    Image.fromarray(mask).save(root / "annotations" / "wall_03.png")
    line = one_error_line(run_script(*train_flags(root, tmp_path / "run", "--epochs", "1")))
    assert line == (f"error: {root / 'annotations' / 'wall_03.png'}: label values 5, 9, 16 are not in the label scheme "
                    "(class ids 0-4, ignore 255); fix or re-export the mask, or describe the dataset's classes in "
                    "classes.json (--classes)")


def test_a_binary_crack_set_trains_and_scores_crack_as_its_damage(tmp_path):
    scheme = scheme_from_dict(BINARY, "binary")
    root = paint_dataset(tmp_path / "cracks", scheme, rgb_masks=True)
    (tmp_path / "binary.json").write_text(json.dumps(BINARY))
    done = run_script(*train_flags(root, tmp_path / "run", "--classes", tmp_path / "binary.json", "--no-report"))
    assert done.returncode == 0, done.stderr
    test = scores_of(tmp_path / "run")
    assert list(test["iou"]) == ["no crack", "crack"]
    assert test["binary_iou"] == pytest.approx(test["iou"]["crack"]), "damage-vs-clean is crack-vs-no-crack"
    weights = json.loads((tmp_path / "run" / "class_weights.json").read_text())
    assert weights["classes"] == ["no crack", "crack"] and len(weights["weights"]) == 2
    # The set has no classes.json: --eval-only takes the checkpoint's scheme and says so.
    evaluated = run_script("train.py", "--eval-only", "--checkpoint", tmp_path / "run" / "best.pt")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "assumed the scheme of" in evaluated.stderr and evaluation_record(evaluated)["test"] == test
    refused = run_script("train.py", "--dry-run", "--heads", "hierarchical", "--data", root, "--classes",
                         tmp_path / "binary.json")
    assert "error: --heads hierarchical: the label scheme of --classes" in one_error_line(refused)
    assert "has no coarse groups" in refused.stderr


def test_hierarchical_heads_take_the_schemes_groups(mural, tmp_path):
    root, _, _, _ = mural
    done = run_script(*train_flags(root, tmp_path / "run", "--heads", "hierarchical", "--epochs", "1",
                                   "--no-report"))
    assert done.returncode == 0, done.stderr
    test = scores_of(tmp_path / "run")
    assert list(test["coarse"]["iou"]) == ["clean", "structural", "surface"]
    assert list(test["binary"]["iou"]) == ["clean", "Damage"]
    assert test["coarse"]["binary_iou"] == pytest.approx(test["binary_iou"]), \
        "grouping the damage classes does not change damage-vs-clean"


def without_timings(run_dir):
    return [{k: v for k, v in r.items() if k not in ("img_s", "epoch_time_s", "peak_mem_mb")}
            for r in records(run_dir)]


def test_artefacts_default_scheme_gives_the_numbers_of_an_explicit_artefact_file(synthetic_root, tmp_path):
    default = tmp_path / "default"
    shutil.copytree(synthetic_root, default, ignore=shutil.ignore_patterns("classes.json"))
    (tmp_path / "artefact.json").write_text(json.dumps(scheme_to_dict(artefact_scheme())))
    assumed = run_script(*train_flags(default, tmp_path / "a", "--no-report", "--select", "inner"))
    given = run_script(*train_flags(default, tmp_path / "b", "--no-report", "--select", "inner", "--classes",
                                    tmp_path / "artefact.json"))
    for done in (assumed, given):
        assert done.returncode == 0, done.stderr
    assert f"note: {default / 'classes.json'} not found; assumed ARTeFACT's built-in scheme" in assumed.stderr
    assert "note:" not in given.stderr
    assert without_timings(tmp_path / "a") == without_timings(tmp_path / "b")
    assert list(scores_of(tmp_path / "a")["iou"]) == list(artefact_scheme().names)


def test_the_readme_example_is_the_five_class_scheme_these_tests_train():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- five-class example: tests/test_schemes.py reads this block -->\n```json\n")[1]
    assert json.loads(block.split("```")[0]) == MURAL
