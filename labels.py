"""Label schemes (class ids, names, colours, the undamaged id, the ignore id, optional coarse groups) as data,
ARTeFACT's scheme as the built-in default, the user error and the command-line helpers (one-line errors, notes,
progress lines).

The bottom of the house: this file imports nothing of the project. No other file hard-codes a class count,
ARTeFACT's names, colours or groups: they take them from a LabelScheme (the dataset's classes.json, a run's
config.json or a checkpoint's config).
"""
import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

DEFAULT_IGNORE = 255
DEFAULT_IGNORE_COLOUR = "#5A0007"
# ARTeFACT's scheme (ARTEFACT.md), in the classes.json format; groups are DESIGN.md's coarse damage groups.
ARTEFACT = {
    "classes": [{"id": i, "name": name, "colour": colour} for i, (name, colour) in enumerate((
        ("Clean", "#000000"), ("Material loss", "#1CE6FF"), ("Peel", "#FF34FF"), ("Dust", "#FF4A46"),
        ("Scratch", "#008941"), ("Hair", "#006FA6"), ("Dirt", "#A30059"), ("Fold", "#FFA500"),
        ("Writing", "#7A4900"), ("Cracks", "#0000A6"), ("Staining", "#63FFAC"), ("Stamp", "#004D43"),
        ("Sticker", "#8FB0FF"), ("Puncture", "#997D87"), ("Burn marks", "#809693"), ("Lightleak", "#F6FF1B")))],
    "clean": 0, "ignore": DEFAULT_IGNORE, "ignore_colour": DEFAULT_IGNORE_COLOUR,
    "groups": [{"name": "Clean", "ids": [0]}, {"name": "Structural loss", "ids": [1, 2, 4, 7, 9, 13, 14]},
               {"name": "Surface deposits", "ids": [3, 5, 6, 10]},
               {"name": "Additions & optical", "ids": [8, 11, 12, 15]}]}
ARTEFACT_SOURCE = "ARTeFACT's built-in scheme"
# metadata.csv columns that results are reported by (ARTeFACT: 10 materials, 4 content types); dataset
# metadata, not labels.
GROUP_COLUMNS = ("material", "content")


class UserError(Exception):
    """A one-line, user-fixable problem; the message names the file or flag and the fix."""


@dataclasses.dataclass(frozen=True)
class LabelScheme:
    """What the ids of a mask mean. Class ids are 0..C-1 (names[i], colours[i] belong to id i); clean is the
    undamaged class (damage is every other id); ignore (outside 0..C-1) marks pixels outside the object, left
    out of every loss and score; groups, when given, are (name, fine ids) of the coarse head, one of them the
    clean id alone. Built and checked by scheme_from_dict; the fields are plain data."""
    names: tuple
    colours: tuple
    clean: int
    ignore: int
    ignore_colour: tuple
    groups: tuple

    @property
    def num_classes(self):
        return len(self.names)

    @property
    def damage_ids(self):
        return tuple(c for c in range(self.num_classes) if c != self.clean)

    @property
    def coarse_of_fine(self):
        """Coarse (group) id of each fine id, or None without groups."""
        if self.groups is None:
            return None
        group_of = {c: g for g, (_, ids) in enumerate(self.groups) for c in ids}
        return tuple(group_of[c] for c in range(self.num_classes))

    @property
    def head_names(self):
        """Class names of each head: fine always; coarse (the groups) and binary (clean / damage) with groups."""
        heads = {"fine": list(self.names)}
        if self.groups is not None:
            heads.update(coarse=[name for name, _ in self.groups], binary=[self.names[self.clean], "Damage"])
        return heads


_SCHEME_KEYS = ("classes", "clean", "ignore", "ignore_colour", "groups")
_CLASS_KEYS = {"id", "name", "colour"}
_HEX = "0123456789abcdefABCDEF"


def _integer(value, where):
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: {value!r} is not a whole number")
    return value


def _colour(value, where):
    """(r, g, b) of "#RRGGBB" or [r, g, b]."""
    if isinstance(value, str) and len(value) == 7 and value[0] == "#" and all(ch in _HEX for ch in value[1:]):
        return tuple(int(value[i:i + 2], 16) for i in (1, 3, 5))
    if isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
        return tuple(value)
    raise UserError(f"{where}: {value!r} is not a colour; write \"#RRGGBB\" or [r, g, b] with values 0-255")


def hex_colour(rgb):
    return "#%02X%02X%02X" % tuple(rgb)


def _classes(entries, source):
    """(names, colours) of the "classes" list, ids 0..C-1 without gaps in any order."""
    if not isinstance(entries, list) or len(entries) < 2:
        raise UserError(f"{source}: \"classes\" must list at least 2 classes as {{\"id\", \"name\", \"colour\"}} "
                        "(e.g. clean and crack); see README 'Your own dataset'")
    by_id = {}
    for k, entry in enumerate(entries):
        where = f"{source}: classes[{k}]"
        if not isinstance(entry, dict) or set(entry) != _CLASS_KEYS:
            raise UserError(f"{where}: give exactly \"id\", \"name\" and \"colour\"")
        class_id = _integer(entry["id"], f"{where} id")
        if class_id in by_id:
            raise UserError(f"{where}: id {class_id} appears twice; give each class one id")
        if not isinstance(entry["name"], str) or not entry["name"].strip():
            raise UserError(f"{where}: name {entry['name']!r} must be a non-empty string")
        by_id[class_id] = entry["name"].strip(), _colour(entry["colour"], f"{where} colour")
    if sorted(by_id) != list(range(len(by_id))):
        missing = min(set(range(len(by_id))) - set(by_id))
        raise UserError(f"{source}: class ids must run 0..{len(by_id) - 1} without gaps, found "
                        f"{', '.join(map(str, sorted(by_id)))} (id {missing} missing); renumber the classes")
    names, colours = zip(*(by_id[c] for c in range(len(by_id))))
    for what, values in (("name", names), ("colour", colours)):
        repeated = next((v for v in values if values.count(v) > 1), None)
        if repeated is not None:
            shown = hex_colour(repeated) if what == "colour" else repr(repeated)
            raise UserError(f"{source}: {what} {shown} is given to two classes; give each class its own")
    return names, colours


def _groups(entries, count, clean, source):
    """((name, sorted fine ids), ...) of "groups": every class in exactly one, the clean id alone in its own."""
    if not isinstance(entries, list) or len(entries) < 2:
        raise UserError(f"{source}: \"groups\" must list at least 2 groups as {{\"name\", \"ids\"}} (the clean "
                        "class alone, then the damage groups), or be left out")
    group_of, groups = {}, []
    for k, entry in enumerate(entries):
        where = f"{source}: groups[{k}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "ids"} or not isinstance(entry["ids"], list) \
                or not entry["ids"] or not isinstance(entry["name"], str) or not entry["name"].strip():
            raise UserError(f"{where}: give a non-empty \"name\" and a non-empty list of class \"ids\"")
        for class_id in entry["ids"]:
            if not 0 <= _integer(class_id, f"{where} ids") < count:
                raise UserError(f"{where}: id {class_id} is not a class (ids 0..{count - 1})")
            if class_id in group_of:
                raise UserError(f"{where}: class {class_id} is also in group {group_of[class_id]!r}; put each "
                                "class in exactly one group")
            group_of[class_id] = entry["name"].strip()
        groups.append((entry["name"].strip(), tuple(sorted(entry["ids"]))))
    missing = sorted(set(range(count)) - set(group_of))
    if missing:
        raise UserError(f"{source}: class {missing[0]} is in no group; put each class in exactly one group")
    names = [name for name, _ in groups]
    if len(set(names)) != len(names):
        raise UserError(f"{source}: group name {next(n for n in names if names.count(n) > 1)!r} appears twice")
    if next(ids for _, ids in groups if clean in ids) != (clean,):
        raise UserError(f"{source}: the clean id {clean} must be alone in its group (the binary head tells it "
                        "from every damage class); move the other ids to a damage group")
    return tuple(groups)


def scheme_from_dict(d, source):
    """A checked LabelScheme from the classes.json format; any problem is a UserError naming source and key."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: expected a JSON object with \"classes\"; see README 'Your own dataset'")
    unknown = sorted(set(d) - set(_SCHEME_KEYS))
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r}; the keys are {', '.join(_SCHEME_KEYS)}")
    names, colours = _classes(d.get("classes"), source)
    clean = _integer(d.get("clean", 0), f"{source}: clean")
    if not 0 <= clean < len(names):
        raise UserError(f"{source}: clean {clean} is not a class id (0..{len(names) - 1})")
    ignore = _integer(d.get("ignore", DEFAULT_IGNORE), f"{source}: ignore")
    if not len(names) <= ignore <= 255:
        raise UserError(f"{source}: ignore {ignore} must lie outside the class ids 0..{len(names) - 1} and fit a "
                        "byte (at most 255)")
    ignore_colour = _colour(d.get("ignore_colour", DEFAULT_IGNORE_COLOUR), f"{source}: ignore_colour")
    if ignore_colour in colours:
        raise UserError(f"{source}: ignore_colour {hex_colour(ignore_colour)} is also class "
                        f"{colours.index(ignore_colour)}'s colour; give the ignored pixels their own colour")
    groups = None if d.get("groups") is None else _groups(d["groups"], len(names), clean, source)
    return LabelScheme(names, colours, clean, ignore, ignore_colour, groups)


def scheme_to_dict(scheme):
    """The classes.json format of a scheme (what config.json and checkpoints carry); scheme_from_dict reads it."""
    out = {"classes": [{"id": c, "name": name, "colour": hex_colour(colour)}
                       for c, (name, colour) in enumerate(zip(scheme.names, scheme.colours))],
           "clean": scheme.clean, "ignore": scheme.ignore, "ignore_colour": hex_colour(scheme.ignore_colour)}
    if scheme.groups is not None:
        out["groups"] = [{"name": name, "ids": list(ids)} for name, ids in scheme.groups]
    return out


def artefact_scheme():
    """ARTeFACT's 16 classes, clean 0, ignore 255, DESIGN.md's four coarse groups: the default scheme."""
    return scheme_from_dict(ARTEFACT, ARTEFACT_SOURCE)


def read_scheme(path, source=None):
    """The checked scheme in a classes.json file; source (default: the path) starts every error line."""
    source = source or str(path)
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{source}: file not found; write a classes.json (README 'Your own dataset')") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot read it ({exc.strerror}); make the file readable") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{source}: not valid JSON ({str(exc).splitlines()[0][:120]}); fix the file") from None
    return scheme_from_dict(content, source)


def scheme_difference(a, b):
    """A few words on the first way scheme a differs from scheme b ("a vs b"), or None when they are equal."""
    if a.num_classes != b.num_classes:
        return f"{a.num_classes} vs {b.num_classes} classes"
    for c, (x, y) in enumerate(zip(a.names, b.names)):
        if x != y:
            return f"class {c} {x!r} vs {y!r}"
    for c, (x, y) in enumerate(zip(a.colours, b.colours)):
        if x != y:
            return f"colour of class {c} ({a.names[c]}) {hex_colour(x)} vs {hex_colour(y)}"
    for what, x, y in (("clean id", a.clean, b.clean), ("ignore id", a.ignore, b.ignore),
                       ("ignore colour", hex_colour(a.ignore_colour), hex_colour(b.ignore_colour))):
        if x != y:
            return f"{what} {x} vs {y}"
    if a.groups != b.groups:
        def shown(groups):
            return "no groups" if groups is None else "groups " + "; ".join(
                f"{name}: {', '.join(map(str, ids))}" for name, ids in groups)
        return f"{shown(a.groups)} vs {shown(b.groups)}"
    return None


def scheme_summary(scheme):
    """One line for logs and checks: the classes by id, the clean and ignore ids, the groups."""
    classes = ", ".join(f"{c} {name}" for c, name in enumerate(scheme.names))
    groups = f", {len(scheme.groups)} coarse groups" if scheme.groups else ", no coarse groups"
    return (f"{scheme.num_classes} classes ({classes}), clean {scheme.clean}, ignore {scheme.ignore}"
            + groups)


def config_scheme(config, where):
    """The label scheme a run's config.json or a checkpoint's config carries; configs written before schemes
    travelled with runs (all of them ARTeFACT's 16 classes) get ARTeFACT's, said in a note."""
    if "classes" in config:
        return scheme_from_dict(config["classes"], f"{where} (classes)")
    scheme = artefact_scheme()
    if config.get("num_classes", scheme.num_classes) != scheme.num_classes:
        raise UserError(f"{where}: records {config['num_classes']} classes but no label scheme; pass a run "
                        "written by this version of train.py")
    note(f"{where} records no label scheme (written before runs carried one); assumed ARTeFACT's "
         f"{scheme.num_classes} classes")
    return scheme


def same_scheme(schemes, wheres, fix):
    """The one scheme of several runs or files, or a UserError naming the first that differs and how."""
    for scheme, where in zip(schemes[1:], wheres[1:]):
        difference = scheme_difference(scheme, schemes[0])
        if difference:
            raise UserError(f"{where}: another label scheme than {wheres[0]} ({difference}); {fix}")
    return schemes[0]


def colour_table(scheme):
    """(256, 3) uint8 rows: each class id's colour, the ignore colour at the ignore id, black elsewhere."""
    import numpy as np
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:scheme.num_classes] = scheme.colours
    table[scheme.ignore] = scheme.ignore_colour
    return table


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends (default: X) to every flag's help, except required ones and where the help already says what the
    default is (defaults decided at run time: per encoder, from the checkpoint, ...)."""

    def _get_help_string(self, action):
        if action.required or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def main_process():
    """True on rank 0 under torchrun or srun, and in a plain process."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0


_noted = set()


def note(text):
    """A `note:` line on stderr for what was assumed, from the main process only, each text once per process
    (the same assumption met by several steps of one command is said once)."""
    if main_process() and text not in _noted:
        _noted.add(text)
        print(f"note: {text}", file=sys.stderr, flush=True)


def run_cli(job, *args):
    """Exit code of job(*args): 0, or 2 after one `error:` line on stderr for a UserError (no traceback)."""
    try:
        job(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def progress(what, total, every=10.0):
    """show(done, note="") prints `what done/total note, ETA h:mm:ss` to stderr at most every `every` seconds
    and once at done == total: plain lines (no carriage returns) that read well in a SLURM log. Only the main
    process prints (rank 0 under torchrun or srun), so several ranks doing the same work print once."""
    main = main_process()
    start = last = time.monotonic()

    def show(done, note=""):
        nonlocal last
        now = time.monotonic()
        if not main or (done < total and now - last < every):
            return
        last = now
        eta = (now - start) / done * (total - done) if done else 0
        print(f"{what} {done}/{total}{note}, ETA {datetime.timedelta(seconds=int(eta))}", file=sys.stderr,
              flush=True)
    return show
