"""Label schemes: ARTeFACT's default as ARTEFACT.md and DESIGN.md give it, classes.json checked in one line naming
the file and the key, where a dataset's scheme comes from, and masks read (never relabelled) by the scheme."""
import copy
import json

import numpy as np
import pytest
from PIL import Image

import files
import prepare
from labels import (UserError, artefact_scheme, read_scheme, scheme_difference, scheme_from_dict, scheme_summary,
                    scheme_to_dict)
from test_schemes import MURAL

# ARTEFACT.md's table and DESIGN.md's coarse groups, written out again here.
ARTEFACT_TABLE = [("Clean", "#000000"), ("Material loss", "#1CE6FF"), ("Peel", "#FF34FF"), ("Dust", "#FF4A46"),
                  ("Scratch", "#008941"), ("Hair", "#006FA6"), ("Dirt", "#A30059"), ("Fold", "#FFA500"),
                  ("Writing", "#7A4900"), ("Cracks", "#0000A6"), ("Staining", "#63FFAC"), ("Stamp", "#004D43"),
                  ("Sticker", "#8FB0FF"), ("Puncture", "#997D87"), ("Burn marks", "#809693"), ("Lightleak", "#F6FF1B")]
ARTEFACT_GROUPS = [("Clean", [0]), ("Structural loss", [1, 2, 4, 7, 9, 13, 14]), ("Surface deposits", [3, 5, 6, 10]),
                   ("Additions & optical", [8, 11, 12, 15])]


def five_classes(**changes):
    """README's 5-class example: clean, crack, flaking, loss, stain."""
    scheme = copy.deepcopy(MURAL)
    scheme.update(changes)
    return scheme


def hex_of(rgb):
    return "#%02X%02X%02X" % rgb


def test_artefact_default_is_the_dataset_table_with_the_design_groups():
    scheme = artefact_scheme()
    assert [(n, hex_of(c)) for n, c in zip(scheme.names, scheme.colours)] == ARTEFACT_TABLE
    assert (scheme.num_classes, scheme.clean, scheme.ignore, hex_of(scheme.ignore_colour)) == (16, 0, 255, "#5A0007")
    assert [(name, list(ids)) for name, ids in scheme.groups] == ARTEFACT_GROUPS
    assert scheme.coarse_of_fine == tuple(next(g for g, (_, ids) in enumerate(ARTEFACT_GROUPS) if c in ids)
                                          for c in range(16))
    assert scheme.head_names["binary"] == ["Clean", "Damage"] and scheme.damage_ids == tuple(range(1, 16))


def test_a_scheme_survives_the_round_trip_through_its_file_format(tmp_path):
    for d in (five_classes(), five_classes(groups=None, clean=3, ignore=7, ignore_colour=[1, 2, 3]),
              scheme_to_dict(artefact_scheme())):
        scheme = scheme_from_dict(d, "x")
        (tmp_path / "classes.json").write_text(json.dumps(scheme_to_dict(scheme)))
        assert read_scheme(tmp_path / "classes.json") == scheme
    assert scheme_from_dict(five_classes(), "x").groups[1] == ("structural", (1, 2, 3))
    shuffled = five_classes(classes=list(reversed(five_classes()["classes"])))
    assert scheme_from_dict(shuffled, "x") == scheme_from_dict(five_classes(), "x"), "ids, not list order, count"


def without_class(k):
    classes = five_classes()["classes"]
    return classes[:k] + classes[k + 1:]


def renamed(k, **entry):
    classes = [dict(c) for c in five_classes()["classes"]]
    classes[k].update(entry)
    return classes


BAD_SCHEMES = [
    (dict(classes=without_class(2), groups=None),
     "class ids must run 0..3 without gaps, found 0, 1, 3, 4 (id 2 missing)"),
    (dict(classes=renamed(1, id=0)), "classes[1]: id 0 appears twice"),
    (dict(classes=five_classes()["classes"][:1], groups=None), '"classes" must list at least 2 classes'),
    (dict(classes=renamed(3, name="crack")), "name 'crack' is given to two classes"),
    (dict(classes=renamed(3, colour="#e6194b")), "colour #E6194B is given to two classes"),
    (dict(classes=renamed(3, colour="yellow")), "classes[3] colour: 'yellow' is not a colour"),
    (dict(classes=renamed(3, colour=[300, 0, 0])), "classes[3] colour: [300, 0, 0] is not a colour"),
    (dict(classes=renamed(2, label="x")), 'classes[2]: give exactly "id", "name" and "colour"'),
    (dict(classes=renamed(2, id="2")), "classes[2] id: '2' is not a whole number"),
    (dict(ignore=4), "ignore 4 must lie outside the class ids 0..4"),
    (dict(ignore=256), "ignore 256 must lie outside the class ids 0..4 and fit a byte"),
    (dict(ignore_colour="#3CB44B"), "ignore_colour #3CB44B is also class 2's colour"),
    (dict(clean=5), "clean 5 is not a class id (0..4)"),
    (dict(ignore_id=200), "unknown key 'ignore_id'"),
    (dict(groups=[{"name": "clean", "ids": [0]}, {"name": "structural", "ids": [1, 2, 3]}]), "class 4 is in no group"),
    (dict(groups=[{"name": "clean", "ids": [0]}, {"name": "a", "ids": [1, 2, 3, 4]}, {"name": "b", "ids": [4]}]),
     "groups[2]: class 4 is also in group 'a'"),
    (dict(groups=[{"name": "clean", "ids": [0, 4]}, {"name": "structural", "ids": [1, 2, 3]}]),
     "the clean id 0 must be alone in its group"),
    (dict(groups=[{"name": "clean", "ids": [0]}, {"name": "x", "ids": [1, 2, 3, 9]}, {"name": "y", "ids": [4]}]),
     "groups[1]: id 9 is not a class (ids 0..4)"),
    (dict(groups=[{"name": "all", "ids": [0, 1, 2, 3, 4]}]), '"groups" must list at least 2 groups'),
]


@pytest.mark.parametrize("changes, words", BAD_SCHEMES, ids=[words[:40] for _, words in BAD_SCHEMES])
def test_a_bad_scheme_file_is_one_line_naming_the_file_and_what_to_fix(tmp_path, changes, words):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(five_classes(**changes)))
    with pytest.raises(UserError) as raised:
        read_scheme(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_unreadable_scheme_files_are_one_line_too(tmp_path):
    with pytest.raises(UserError, match="missing.json: file not found"):
        read_scheme(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"classes": [')
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        read_scheme(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match='list.json: expected a JSON object with "classes"'):
        read_scheme(tmp_path / "list.json")


def test_scheme_difference_names_the_first_difference():
    five = scheme_from_dict(five_classes(), "a")
    assert scheme_difference(five, five) is None
    cases = [(five_classes(classes=renamed(4, name="dirt")), "class 4 'stain' vs 'dirt'"),
             (five_classes(classes=renamed(2, colour="#000001")), "colour of class 2 (flaking) #3CB44B vs #000001"),
             (five_classes(clean=4, groups=None), "clean id 0 vs 4"),
             (five_classes(ignore=9), "ignore id 255 vs 9"),
             (five_classes(groups=None), "vs no groups"),
             (scheme_to_dict(artefact_scheme()), "5 vs 16 classes")]
    for other, words in cases:
        assert words in scheme_difference(five, scheme_from_dict(other, "b"))


def write_pair(root, mask, name="a"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    Image.fromarray(np.full(mask.shape[:2] + (3,), 128, np.uint8)).save(root / "images" / f"{name}.png")
    Image.fromarray(mask).save(root / "annotations" / f"{name}.png")


def test_the_scheme_comes_from_the_flag_else_the_folder_else_artefact_with_a_note(tmp_path, capsys):
    root = tmp_path / "mural"
    write_pair(root, np.zeros((4, 4), np.uint8))
    scheme, source = files.dataset_scheme(root)
    assert scheme == artefact_scheme() and "assumed" in source
    err = capsys.readouterr().err
    assert err.startswith(f"note: {root / 'classes.json'} not found; assumed ARTeFACT's") and err.count("\n") == 1
    (root / "classes.json").write_text(json.dumps(five_classes()))
    assert files.dataset_scheme(root) == (scheme_from_dict(five_classes(), "x"), str(root / "classes.json"))
    other = tmp_path / "binary.json"
    other.write_text(json.dumps(five_classes(classes=five_classes()["classes"][:2], groups=None)))
    scheme, source = files.dataset_scheme(root, other)
    assert scheme.names == ("clean", "crack") and source == f"--classes {other}"
    assert capsys.readouterr().err == "", "a scheme that was given is not a note"


def test_rgb_masks_are_read_through_the_schemes_palette(tmp_path):
    scheme = scheme_from_dict(five_classes(ignore=9, ignore_colour="#808080"), "x")
    ids = np.array([[0, 1, 2], [3, 4, 9]], np.uint8)
    rgb = np.array([[scheme.colours[v] if v < 5 else scheme.ignore_colour for v in row] for row in ids.tolist()],
                   np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(files.read_mask(tmp_path / "rgb.png", scheme), ids)
    # The same mask in ARTeFACT's palette is refused, never read as something else.
    with pytest.raises(UserError, match=r"rgb.png: colour mask has colours outside the label scheme's palette "
                                        r"\(#3CB44B, #4363D8, #808080, #E6194B and 1 more\)"):
        files.read_mask(tmp_path / "rgb.png", artefact_scheme())


def test_black_and_white_rgb_masks_are_the_palette_colours_not_grey_ids(tmp_path):
    binary = scheme_from_dict({"classes": [{"id": 0, "name": "no crack", "colour": "#000000"},
                                           {"id": 1, "name": "crack", "colour": "#FFFFFF"}]}, "x")
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[1] = 255
    Image.fromarray(rgb).save(tmp_path / "bw.png")
    np.testing.assert_array_equal(files.read_mask(tmp_path / "bw.png", binary), (rgb[..., 0] > 0).astype(np.uint8))


@pytest.mark.parametrize("value", [5, 17, 254])
def test_ids_outside_the_scheme_are_refused_naming_the_file_and_the_ids(tmp_path, value):
    scheme = scheme_from_dict(five_classes(), "x")
    mask = np.zeros((4, 6), np.uint8)
    mask[0, 0], mask[1, 1], mask[2, 2] = 4, 255, value
    write_pair(tmp_path / "ds", mask)
    (tmp_path / "ds" / "classes.json").write_text(json.dumps(five_classes()))
    with pytest.raises(UserError) as raised:
        files.read_mask(tmp_path / "ds" / "annotations" / "a.png", scheme)
    assert str(raised.value).startswith(f"{tmp_path / 'ds' / 'annotations' / 'a.png'}: label values {value} are not "
                                        "in the label scheme (class ids 0-4, ignore 255)")
    with pytest.raises(UserError, match=f"a.png: label values {value} are not in the label scheme"):
        prepare.check(tmp_path / "ds")


def test_check_names_the_datasets_classes_and_where_the_scheme_came_from(tmp_path, capsys):
    mask = np.zeros((4, 6), np.uint8)
    mask[0, :3] = (1, 4, 255)
    write_pair(tmp_path / "ds", mask)
    (tmp_path / "ds" / "classes.json").write_text(json.dumps(five_classes()))
    assert prepare.main(["check", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"ok: 1 image/mask pairs in {tmp_path / 'ds'}; 23 labelled pixels, 1 ignored; classes present: "
                      "clean, crack, stain; absent: flaking, loss")
    assert out[1] == (f"label scheme ({tmp_path / 'ds' / 'classes.json'}): "
                      f"{scheme_summary(scheme_from_dict(five_classes(), 'x'))}")


def test_prepare_classes_writes_artefacts_scheme_as_a_template_and_keeps_an_existing_one(tmp_path, capsys):
    assert prepare.main(["classes", str(tmp_path)]) == 0
    assert read_scheme(tmp_path / "classes.json") == artefact_scheme()
    assert prepare.main(["classes", str(tmp_path)]) == 2
    assert "classes.json: exists; edit it" in capsys.readouterr().err
