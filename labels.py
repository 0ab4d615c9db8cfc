"""ARTeFACT's label scheme (fine, coarse and binary ids, names, colours, the ignore index), the user error and
the command-line helpers (one-line errors, progress lines).

The bottom of the house: every other file takes its class facts from here, and this file imports nothing
of the project.
"""
import argparse
import datetime
import os
import sys
import time

NUM_CLASSES = 16
IGNORE_INDEX = 255
CLASS_NAMES = ["Clean", "Material loss", "Peel", "Dust", "Scratch", "Hair", "Dirt", "Fold", "Writing",
               "Cracks", "Staining", "Stamp", "Sticker", "Puncture", "Burn marks", "Lightleak"]
PALETTE = [(0, 0, 0), (0x1C, 0xE6, 0xFF), (0xFF, 0x34, 0xFF), (0xFF, 0x4A, 0x46), (0x00, 0x89, 0x41),
           (0x00, 0x6F, 0xA6), (0xA3, 0x00, 0x59), (0xFF, 0xA5, 0x00), (0x7A, 0x49, 0x00), (0x00, 0x00, 0xA6),
           (0x63, 0xFF, 0xAC), (0x00, 0x4D, 0x43), (0x8F, 0xB0, 0xFF), (0x99, 0x7D, 0x87), (0x80, 0x96, 0x93),
           (0xF6, 0xFF, 0x1B)]
BACKGROUND_COLOUR = (0x5A, 0x00, 0x07)

# DESIGN.md's damage groups over ARTeFACT's real class list: coarse id of each fine id.
COARSE_OF_FINE = (0, 1, 1, 2, 1, 2, 2, 1, 3, 1, 2, 3, 3, 1, 1, 3)
COARSE_NAMES = ["Clean", "Structural loss", "Surface deposits", "Additions & optical"]
BINARY_NAMES = ["Clean", "Damage"]
# metadata.csv columns that results are reported by (ARTeFACT: 10 materials, 4 content types).
GROUP_COLUMNS = ("material", "content")
# Class names of each head of a hierarchical model ("fine" alone for a plain one).
HEAD_NAMES = {"fine": CLASS_NAMES, "coarse": COARSE_NAMES, "binary": BINARY_NAMES}


def colour_table():
    """(256, 3) uint8 rows: ARTeFACT colours for ids 0-15, the background colour for 255, black elsewhere."""
    import numpy as np
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:NUM_CLASSES] = PALETTE
    table[IGNORE_INDEX] = BACKGROUND_COLOUR
    return table


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends (default: X) to every flag's help, except required ones and where the help already says what the
    default is (defaults decided at run time: per encoder, from the checkpoint, ...)."""

    def _get_help_string(self, action):
        if action.required or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


class UserError(Exception):
    """A one-line, user-fixable problem; the message names the file or flag and the fix."""


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
    main_process = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
    start = last = time.monotonic()

    def show(done, note=""):
        nonlocal last
        now = time.monotonic()
        if not main_process or (done < total and now - last < every):
            return
        last = now
        eta = (now - start) / done * (total - done) if done else 0
        print(f"{what} {done}/{total}{note}, ETA {datetime.timedelta(seconds=int(eta))}", file=sys.stderr,
              flush=True)
    return show
