"""Class weights: formulas, ordering, mean, cap and zero counts on ARTeFACT's pixel counts; counting; JSON; CLI."""
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import weights
from conftest import ROOT, run_script
from labels import UserError, artefact_scheme, scheme_from_dict
from weights import (DEFAULT_MAX_RATIO, METHODS, compute_weights, count_pixels, load_weights, resolve_class_weights,
                     save_weights)

ARTEFACT = artefact_scheme()
CLASS_NAMES = list(ARTEFACT.names)
# Binary crack / no-crack masks whose outside-the-object pixels are 7, not 255.
BINARY = scheme_from_dict({"classes": [{"id": 0, "name": "no crack", "colour": "#000000"},
                                       {"id": 1, "name": "crack", "colour": "#FFFFFF"}], "ignore": 7}, "binary")
# ARTEFACT.md: 417 images thumbnailed to at most 512 px, ids 0..15 in order.
ARTEFACT_COUNTS = np.array([69_751_540, 2_922_531, 3_877_364, 23_110, 171_255, 5_407, 238_265, 661_706, 74_397,
                            475_478, 804_722, 38_810, 93_514, 18_484, 1_124, 560_273])


def formula(method, counts):
    """The documented raw weight of each class, one class at a time."""
    total = sum(int(n) for n in counts)
    frequencies = [int(n) / total for n in counts]
    median = statistics.median(frequencies)
    raw = {"inverse": lambda f, n: 1 / f,
           "inverse_sqrt": lambda f, n: 1 / math.sqrt(f),
           "inverse_sqrt_log_scaled": lambda f, n: math.log(1 + 1 / math.sqrt(f)),
           "median_frequency": lambda f, n: median / f,
           "effective_number": lambda f, n: (1 - 0.9999) / (1 - 0.9999 ** n),
           "none": lambda f, n: 1.0}[method]
    return np.array([raw(f, int(n)) for f, n in zip(frequencies, counts)])


def assert_non_increasing_in_frequency(counts, weights):
    order = np.argsort(counts, kind="stable")
    by_rarity = weights[order]
    assert (np.diff(by_rarity) <= 1e-12).all(), list(zip(np.asarray(CLASS_NAMES)[order], by_rarity))


@pytest.mark.parametrize("method", METHODS)
def test_artefact_weights_ordering_mean_and_cap(method):
    weights = compute_weights(ARTEFACT_COUNTS, method)
    assert weights.dtype == np.float64 and weights.shape == (16,)
    assert np.isfinite(weights).all() and (weights > 0).all()
    assert_non_increasing_in_frequency(ARTEFACT_COUNTS, weights)
    assert weights.mean() == pytest.approx(1.0, rel=1e-12)
    assert weights.max() / weights.min() <= DEFAULT_MAX_RATIO * (1 + 1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_uncapped_weights_follow_the_documented_formula(method):
    weights = compute_weights(ARTEFACT_COUNTS, method, max_ratio=None)
    expected = formula(method, ARTEFACT_COUNTS)
    np.testing.assert_allclose(weights, expected / expected.mean(), rtol=1e-9)


def test_plain_inverse_uncapped_ratio_is_commonest_over_rarest_count():
    weights = compute_weights(ARTEFACT_COUNTS, "inverse", max_ratio=None)
    ratio = ARTEFACT_COUNTS.max() / ARTEFACT_COUNTS.min()
    assert ratio == pytest.approx(62_056.5, rel=1e-5)
    assert weights.max() / weights.min() == pytest.approx(ratio, rel=1e-9)
    np.testing.assert_array_equal(compute_weights(ARTEFACT_COUNTS, "inverse", max_ratio=math.inf), weights)


@pytest.mark.parametrize("method", ["inverse", "inverse_sqrt", "median_frequency"])
def test_cap_clips_both_ends_by_the_same_factor_and_keeps_the_middle(method):
    raw = formula(method, ARTEFACT_COUNTS)
    capped = compute_weights(ARTEFACT_COUNTS, method, max_ratio=36)
    assert capped.max() / capped.min() == pytest.approx(36, rel=1e-9)
    # Inside the window raw weights are only rescaled; the window is centred on the extremes' geometric mean.
    centre = math.sqrt(raw.min() * raw.max())
    low, high = centre / 6, centre * 6
    middle = (raw > low) & (raw < high)
    assert middle.any() and not middle.all()
    scale = capped[middle] / raw[middle]
    np.testing.assert_allclose(scale, scale[0], rtol=1e-9)
    np.testing.assert_allclose(capped, np.clip(raw, low, high) * scale[0], rtol=1e-9)


def test_default_method_on_artefact_is_compressed_below_the_cap():
    weights = compute_weights(ARTEFACT_COUNTS)
    np.testing.assert_allclose(weights, compute_weights(ARTEFACT_COUNTS, "inverse_sqrt_log_scaled", max_ratio=None))
    assert 5 < weights.max() / weights.min() < 10
    assert weights.argmax() == CLASS_NAMES.index("Burn marks") and weights.argmin() == CLASS_NAMES.index("Clean")


@pytest.mark.parametrize("method", METHODS)
def test_classes_without_pixels_get_the_largest_weight(method):
    counts = ARTEFACT_COUNTS.copy()
    counts[CLASS_NAMES.index("Burn marks")] = 0
    counts[CLASS_NAMES.index("Hair")] = 0
    weights = compute_weights(counts, method)
    present = counts > 0
    assert np.isfinite(weights).all()
    assert weights[~present].tolist() == [weights[present].max()] * 2
    assert weights[present].mean() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(weights[present], compute_weights(counts[present], method), rtol=1e-12)
    assert weights.max() / weights.min() <= DEFAULT_MAX_RATIO * (1 + 1e-12)
    assert_non_increasing_in_frequency(counts, weights)


def test_bad_requests_are_user_errors():
    with pytest.raises(UserError, match="inverse_sqrt_log_scaled"):
        compute_weights(ARTEFACT_COUNTS, "balanced")
    with pytest.raises(UserError, match="--max-ratio"):
        compute_weights(ARTEFACT_COUNTS, "inverse", max_ratio=0.5)
    with pytest.raises(UserError, match="no labelled pixels"):
        compute_weights(np.zeros(16, dtype=np.int64))


def random_masks(seed=0, count=3, shape=(9, 11)):
    rng = np.random.default_rng(seed)
    labels = np.array(list(range(16)) + [255])
    return [labels[rng.integers(0, len(labels), size=shape)].astype(np.uint8) for _ in range(count)]


def brute_force_counts(masks):
    return np.array([sum(int((mask == c).sum()) for mask in masks) for c in range(16)])


def test_count_pixels_matches_a_per_class_count_for_lists_stacks_and_generators():
    masks = random_masks()
    expected = brute_force_counts(masks)
    for given in (masks, np.stack(masks), (m for m in masks)):
        counts = count_pixels(given, ARTEFACT)
        assert counts.dtype == np.int64 and counts.shape == (16,)
        np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(count_pixels(masks[0], ARTEFACT), brute_force_counts(masks[:1]))


def test_count_pixels_does_not_depend_on_the_chunk_size(monkeypatch):
    masks = random_masks()
    monkeypatch.setattr(weights, "_CHUNK", 7)
    np.testing.assert_array_equal(count_pixels(masks, ARTEFACT), brute_force_counts(masks))


def test_count_pixels_leaves_out_the_ignore_id_of_the_scheme():
    masks = random_masks()
    more_background = [np.pad(m, 3, constant_values=255) for m in masks]
    np.testing.assert_array_equal(count_pixels(more_background, ARTEFACT), count_pixels(masks, ARTEFACT))
    assert count_pixels([np.full((4, 4), 255, np.uint8)], ARTEFACT).sum() == 0


    binary = [np.array([[0, 1, 7], [7, 1, 1]], np.uint8)]
    np.testing.assert_array_equal(count_pixels(binary, BINARY), [1, 3])


@pytest.mark.parametrize("scheme, bad", [(ARTEFACT, 16), (ARTEFACT, 100), (ARTEFACT, 254), (BINARY, 2),
                                         (BINARY, 255)])
def test_count_pixels_rejects_labels_outside_the_scheme(scheme, bad):
    masks = [np.array([[0, 1, scheme.ignore]], np.uint8), np.array([[1, 0, bad]], np.uint8)]
    with pytest.raises(UserError, match=f"labels {bad} are not in the label scheme"):
        count_pixels(masks, scheme)


def test_count_pixels_rejects_values_that_do_not_fit_a_byte():
    with pytest.raises(UserError, match="0-255"):
        count_pixels([np.array([[0, 300]], dtype=np.int64)], ARTEFACT)
    np.testing.assert_array_equal(count_pixels([np.array([[0, 3, 255]], dtype=np.int64)], ARTEFACT),
                                  brute_force_counts([np.array([[0, 3, 255]])]))


def test_json_round_trip(tmp_path):
    weights = compute_weights(ARTEFACT_COUNTS, "median_frequency")
    path = tmp_path / "w.json"
    save_weights(path, "median_frequency", ARTEFACT_COUNTS, weights, 36.0, ARTEFACT.names)
    np.testing.assert_array_equal(load_weights(path, ARTEFACT), weights)
    record = json.loads(path.read_text())
    assert record["method"] == "median_frequency" and record["max_ratio"] == 36.0
    assert record["classes"] == CLASS_NAMES and record["counts"] == ARTEFACT_COUNTS.tolist()
    np.testing.assert_array_equal(resolve_class_weights(str(path), None, ARTEFACT), weights)


def test_weights_of_another_label_scheme_are_refused_naming_the_class(tmp_path):
    path = tmp_path / "binary.json"
    save_weights(path, "inverse", [90, 10], compute_weights([90, 10], "inverse"), 36.0, BINARY.names)
    np.testing.assert_array_equal(load_weights(path, BINARY), compute_weights([90, 10], "inverse"))
    other = scheme_from_dict({"classes": [{"id": 0, "name": "no crack", "colour": "#000000"},
                                          {"id": 1, "name": "loss", "colour": "#FFFFFF"}]}, "other")
    with pytest.raises(UserError, match="binary.json: weights of other classes .*class 1 is 'crack' there, 'loss'"):
        load_weights(path, other)
    with pytest.raises(UserError, match="needs 16 finite positive weights"):
        load_weights(path, ARTEFACT)


def test_load_weights_names_the_file_when_it_is_unusable(tmp_path):
    with pytest.raises(UserError, match="missing.json"):
        load_weights(tmp_path / "missing.json", ARTEFACT)
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"weights": [1.0] * 15}))
    with pytest.raises(UserError, match="short.json"):
        load_weights(short, ARTEFACT)
    garbled = tmp_path / "garbled.json"
    garbled.write_text("{")
    with pytest.raises(UserError, match="garbled.json"):
        load_weights(garbled, ARTEFACT)


def test_class_weights_flag_takes_a_method_or_a_file():
    masks = random_masks()
    counts = count_pixels(np.stack(masks), ARTEFACT)
    np.testing.assert_array_equal(resolve_class_weights("inverse", counts, ARTEFACT),
                                  compute_weights(brute_force_counts(masks), "inverse"))
    with pytest.raises(UserError, match="--class-weights"):
        resolve_class_weights("balanced", masks, ARTEFACT)


def write_folder(root, masks):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i, mask in enumerate(masks):
        Image.fromarray(np.zeros(mask.shape + (3,), np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask, mode="L").save(root / "annotations" / f"s{i}.png")


def run_cli(*args):
    return run_script("weights.py", *args)


def test_cli_prints_the_table_and_writes_json_beside_the_runs_not_into_the_data(tmp_path):
    masks = random_masks()
    write_folder(tmp_path / "set", masks)
    before = sorted((tmp_path / "set").rglob("*"))
    result = run_script(ROOT / "weights.py", "--data", str(tmp_path / "set"), "--method", "inverse_sqrt",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted((tmp_path / "set").rglob("*")) == before
    written = Path("runs") / "class_weights" / "set-inverse_sqrt.json"
    assert str(written) in result.stdout
    written = tmp_path / written
    record = json.loads(written.read_text())
    expected_counts = brute_force_counts(masks)
    assert record["counts"] == expected_counts.tolist()
    np.testing.assert_allclose(record["weights"], compute_weights(expected_counts, "inverse_sqrt"))
    for name in CLASS_NAMES:
        assert name in result.stdout

    out = tmp_path / "elsewhere.json"
    result = run_cli("--data", str(tmp_path / "set"), "--method", "inverse", "--max-ratio", "inf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["max_ratio"] is None
    np.testing.assert_allclose(load_weights(out, ARTEFACT),
                               compute_weights(expected_counts, "inverse", max_ratio=None))


def test_cli_reports_user_errors_in_one_line_with_exit_2(tmp_path):
    (tmp_path / "images").mkdir()
    result = run_cli("--data", str(tmp_path), "--method", "inverse")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "annotations" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
