"""What a conservator looks at: overlays whose outlines and legend grow with the image, and index.html, one
self-contained page over a prediction folder, opened in a real headless Chromium."""
import base64
import fcntl
import html.parser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from areas import area_report, pixel_scale
from conftest import apt_install, module_folder
from gallery import VIEW_SIDE
from overlay import legend, legend_entries, render_overlay, text_runs
from predict import main
from test_predict import ARTEFACT, CLASS_NAMES, random_image, write_checkpoint

CRACKS = CLASS_NAMES.index("Cracks")


def thin_crack(height, width):
    labels = np.zeros((height, width), np.uint8)
    labels[height // 2, width // 8: width - width // 8] = CRACKS
    return labels


@pytest.mark.parametrize("width", [1200, 4800])
def test_a_one_pixel_crack_stays_visible_when_the_overlay_is_viewed_at_1200_px(width):
    # Grey paint; a crack one pixel high. Viewed shrunk to 1200 px wide (Lanczos, as a viewer does), the row of
    # the crack must still be clearly blue (Cracks is dark blue: low red and green, blue well above the grey).
    height = width * 2 // 3
    image = np.full((height, width, 3), 150, np.uint8)
    labels = thin_crack(height, width)
    overlay = render_overlay(image, labels, area_report(labels, ARTEFACT), ARTEFACT).crop((0, 0, width, height))
    factor = width // 1200
    seen = np.asarray(overlay.resize((1200, height // factor), Image.LANCZOS)).astype(int)
    row = seen[height // 2 // factor, 300:900]
    blueness = row[:, 2] - (row[:, 0] + row[:, 1]) / 2
    assert blueness.min() > 40, f"the crack fades to {blueness.min():.0f} at {width} px"


def legend_text_height(strip):
    """Rows of the legend strip's first line that hold dark (text) pixels."""
    dark = (np.asarray(strip.convert("L")) < 100).any(axis=1)
    rows = np.flatnonzero(dark)
    first_line = rows[rows < rows[0] + strip.height // 2]
    return first_line[-1] - first_line[0] + 1


def test_the_legend_font_grows_with_the_overlay_so_it_reads_the_same_viewed_downscaled():
    labels = thin_crack(60, 80)
    report = area_report(labels, ARTEFACT)
    small, large = legend(1200, report, False, ARTEFACT), legend(4800, report, False, ARTEFACT)
    assert large.width == 4800 and small.width == 1200
    assert legend_text_height(large) == pytest.approx(4 * legend_text_height(small), rel=0.2)


def test_every_character_of_the_legend_is_drawn_with_a_glyph_the_font_has():
    # Pillow's built-in font has no "²": drawn as it is, "mm²" ends in an empty box.
    labels = thin_crack(60, 80)
    report = area_report(labels, ARTEFACT, scale=pixel_scale(None, px_per_mm=10))
    texts = [text for _, text in legend_entries(report, True, ARTEFACT)]
    assert any("mm²" in text for text in texts)
    font = ImageFont.load_default(size=24)
    missing = bytes(font.getmask("\uffff"))
    for text in texts:
        for part, _ in text_runs(text):
            for character in set(part) - {" "}:
                assert bytes(font.getmask(character)) != missing, f"{character!r} of {text!r} has no glyph"


@pytest.fixture(scope="module")
def folder(request, tmp_path_factory):
    """A prediction folder over three images: one wider than a card (shown from a downscaled copy), one with
    an alpha channel (an outside-object layer), one small."""
    with module_folder(request, tmp_path_factory, "gallery") as root:
        checkpoint = write_checkpoint(root, work_size=96, varied=True)
        (root / "in").mkdir()
        wide = random_image(700, 1500)
        wide[:, :700] //= 3
        Image.fromarray(wide).save(root / "in" / "altarpiece.png")
        rgba = np.concatenate([random_image(120, 90, seed=1), np.full((120, 90, 1), 255, np.uint8)], axis=2)
        rgba[:, :15, 3] = 0
        Image.fromarray(rgba).save(root / "in" / "icon.png")
        Image.fromarray(random_image(60, 80, seed=2)).save(root / "in" / "fragment.jpg")
        assert main([str(a) for a in ["--checkpoint", checkpoint, root / "in", "--out", root / "out"]]) == 0
        yield root / "out"


class PageParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(page):
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.tags


def test_the_page_is_self_contained_and_every_picture_and_link_is_in_the_folder(folder):
    page = (folder / "index.html").read_text(encoding="utf-8")
    tags = parse(folder / "index.html")
    assert not [t for t, attrs in tags if t in ("link", "iframe", "object", "embed") or (t == "script" and "src" in attrs)]
    references = [attrs.get("src") or attrs.get("href") for _, attrs in tags if "src" in attrs or "href" in attrs]
    assert references and not re.search(r"(https?:)?//|url\(", page), "no network, no CDN"
    for reference in references:
        if not reference.startswith("#"):
            assert (folder / reference).is_file(), reference
    rows = {row["file"] for row in json_reports(folder)}
    cards = [attrs["id"] for t, attrs in tags if t == "section"]
    assert len(cards) == len(rows) == 3
    assert {f"#{card}" for card in cards} <= set(references), "the overview links to every card"


def json_reports(folder):
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*_report.json"))]


def test_each_card_shows_a_downscaled_copy_with_one_layer_per_class_drawn_where_the_map_has_it(folder):
    tags = parse(folder / "index.html")
    for report in json_reports(folder):
        mask = Image.open(folder / report["outputs"]["mask"])
        shown = [attrs["src"] for t, attrs in tags if t == "img" and attrs.get("alt") == report["file"]]
        assert len(shown) == 1
        view = Image.open(folder / shown[0])
        assert max(view.size) == min(VIEW_SIDE, max(mask.size))
        assert view.width / view.height == pytest.approx(mask.width / mask.height, rel=0.01)
        labels = np.asarray(mask.resize(view.size, Image.NEAREST))
        stem = Path(report["file"]).stem
        layers = {int(attrs["data-class"]): attrs["src"] for t, attrs in tags
                  if t == "img" and "data-class" in attrs and attrs["src"].startswith(f"gallery/{stem}_")}
        assert set(layers) == set(np.unique(labels).tolist()) - {ARTEFACT.clean}
        for class_id, src in layers.items():
            alpha = np.asarray(Image.open(folder / src).convert("RGBA"))[..., 3]
            np.testing.assert_array_equal(alpha > 0, labels == class_id, err_msg=src)
        toggles = {int(attrs["data-class"]) for t, attrs in tags if t == "input" and attrs.get("class") == "class"}
        assert set(layers) <= toggles
        assert (255 in layers) == (report["object_source"] != "whole image")


def install_chromium():
    apt_install(["chromium"], lambda: shutil.which("chromium"))
    return shutil.which("chromium")


def headless(tmp_path, *flags):
    """A headless Chromium command with a fresh profile, a fixed window and no network side channels."""
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return [install_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--hide-scrollbars", "--window-size=1400,1600", *flags]


def chromium(tmp_path, url, *action):
    """Runs headless Chromium on url; returns the console lines ("message", source) it logged and its stdout."""
    done = subprocess.run(headless(tmp_path, "--enable-logging=stderr", "--v=1", "--virtual-time-budget=5000",
                                   *action, url), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return re.findall(r':CONSOLE:\d+\] "(.*)", source: ', done.stderr), done.stdout


def test_the_page_loads_in_chromium_without_script_errors_and_shows_every_picture(folder, tmp_path):
    console, dom = chromium(tmp_path, (folder / "index.html").as_uri(), "--dump-dom")
    cards = len(json_reports(folder))
    images = len([t for t, _ in parse(folder / "index.html") if t == "img"])
    assert console == [f"gallery ready: {cards} cards, {images}/{images} images"]
    assert re.search(rf'<body data-images="{images}" data-loaded="{images}" data-cards="{cards}"', dom)


def devtools(link, method, params, session=None):
    """Sends one DevTools command over Chromium's --remote-debugging-pipe and returns its result; the page's
    uncaught exceptions reported meanwhile go to link["exceptions"]."""
    link["calls"] += 1
    command = {"id": link["calls"], "method": method, "params": params}
    if session:
        command["sessionId"] = session
    link["commands"].write(json.dumps(command).encode() + b"\0")
    link["commands"].flush()
    while True:
        chunk = link["replies"].read1(1 << 20)
        assert chunk, "chromium closed its DevTools pipe"
        *replies, link["buffered"] = (link["buffered"] + chunk).split(b"\0")
        for reply in map(json.loads, replies):
            if reply.get("method") == "Runtime.exceptionThrown":
                link["exceptions"].append(reply["params"]["exceptionDetails"])
            if reply.get("id") == link["calls"]:
                assert "error" not in reply, reply
                return reply["result"]


# Resolves once the page's load handler has counted its images and every image is decoded, two frames later,
# so the screenshot cannot catch a card half drawn however loaded the machine is.
READY = """new Promise(function (done) {
  (function wait() {
    if (!document.body || !document.body.dataset.loaded) { return setTimeout(wait, 20); }
    Promise.all(Array.from(document.images, function (i) { return i.decode(); })).then(function () {
      requestAnimationFrame(function () {
        requestAnimationFrame(function () { done(document.body.dataset.loaded); });
      });
    });
  })();
})"""


def onto(fd, target):
    """Moves fd onto target in the child, first out of the way of 3 and 4 so neither pipe end clobbers the
    other."""
    os.dup2(fcntl.fcntl(fd, fcntl.F_DUPFD, 10), target)


def screenshot(tmp_path, url):
    """The page at url as Chromium paints it once the gallery is ready, driven over DevTools: the fixed
    --virtual-time-budget of `chromium` can end before the last image is decoded on a loaded machine."""
    read_commands, write_commands = os.pipe()
    read_replies, write_replies = os.pipe()
    # Chromium reads commands on fd 3 and writes replies on fd 4; close_fds would close those two again after
    # preexec_fn has put the pipes there.
    process = subprocess.Popen(
        headless(tmp_path, "--remote-debugging-pipe", "about:blank"), close_fds=False, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: (onto(read_commands, 3), onto(write_replies, 4)))
    os.close(read_commands)
    os.close(write_replies)
    link = {"commands": os.fdopen(write_commands, "wb"), "replies": os.fdopen(read_replies, "rb"), "calls": 0,
            "buffered": b"", "exceptions": []}
    try:
        target = devtools(link, "Target.createTarget", {"url": "about:blank"})["targetId"]
        session = devtools(link, "Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        devtools(link, "Runtime.enable", {}, session)
        devtools(link, "Page.navigate", {"url": url}, session)
        ready = devtools(link, "Runtime.evaluate", {"expression": READY, "awaitPromise": True}, session)
        shot = devtools(link, "Page.captureScreenshot", {"format": "png"}, session)
    finally:
        process.kill()
        process.wait()
        link["commands"].close()
        link["replies"].close()
    assert "exceptionDetails" not in ready and not link["exceptions"], (ready, link["exceptions"])
    path = tmp_path / f"shot{len(list(tmp_path.glob('shot*')))}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_hiding_a_class_in_chromium_changes_the_picture_and_hiding_an_absent_one_does_not(folder, tmp_path):
    reports = json_reports(folder)
    top = max((e for e in reports[0]["classes"] if e["id"] != ARTEFACT.clean), key=lambda e: e["pixels"])
    # #hide applies to every card: the control hides a class no image has.
    absent = next(k for k in range(ARTEFACT.num_classes) if all(r["classes"][k]["pixels"] == 0 for r in reports))
    page = (folder / "index.html").as_uri()
    shown, hidden, control = (screenshot(tmp_path, page + fragment)
                              for fragment in ("", f"#hide={top['id']}", f"#hide={absent}"))
    changed = np.abs(shown - hidden).sum(axis=2) > 0
    np.testing.assert_array_equal(shown, control)
    # The largest class of the first image covers thousands of screen pixels of its card.
    assert changed.sum() > 1000
