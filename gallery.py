"""The HTML page over a prediction folder: ``index.html`` in predict.py's --out, one self-contained page (no
server, no network: inline CSS and script, pictures referenced relatively from ``gallery/``) with a thumbnail
overview and a card per image: the photograph with its damage on top (one layer per class), an opacity slider,
a before/after button, a toggle per class in its legend with the areas, and links to the full-size overlay, mask
and report. ``index.html#hide=ID,ID`` opens it with those class ids hidden."""
import html

import numpy as np
from PIL import Image

from files import resize_image, resize_labels
from labels import colour_table
from overlay import area_text, blend, outline_ids, outline_width, percent_text

# Long side of a card's pictures and of a thumbnail (px); large images are shown from these copies.
VIEW_SIDE = 1280
THUMB_SIDE = 240
FOLDER = "gallery"


def _fit(height, width, side):
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def card_pictures(out, stem, image, labels, scheme):
    """Writes a card's pictures into out/gallery (the photograph at most VIEW_SIDE px, one RGBA layer per class
    and for the outside of the object: fill at half strength, outlines in full colour, and a thumbnail of the
    overlay) and returns their paths relative to out: {"view", "thumb", "layers": {class id: path}}."""
    height, width = _fit(*labels.shape, VIEW_SIDE)
    view, view_labels = resize_image(image, height, width), resize_labels(labels, height, width)
    folder = out / FOLDER
    folder.mkdir(exist_ok=True)
    names = {"view": f"{FOLDER}/{stem}.jpg", "thumb": f"{FOLDER}/{stem}_thumb.jpg", "layers": {}}
    Image.fromarray(view).save(out / names["view"], quality=88)
    edges = outline_ids(view_labels, scheme, outline_width(height, width))
    colours = colour_table(scheme)
    for class_id in np.unique(view_labels).tolist():
        if class_id == scheme.clean:
            continue
        layer = np.zeros((height, width, 4), np.uint8)
        layer[view_labels == class_id] = (*colours[class_id], 128)
        layer[edges == class_id] = (*colours[class_id], 255)
        names["layers"][class_id] = f"{FOLDER}/{stem}_{class_id}.png"
        Image.fromarray(layer).save(out / names["layers"][class_id])
    thumb = Image.fromarray(blend(view, view_labels, scheme, edges=edges))
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    thumb.save(out / names["thumb"], quality=85)
    return names


STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0 24px 48px;color:#222;background:#fafafa}
h1{font-size:22px;margin:20px 0 4px}.overview{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0 24px}
.overview a{display:block;width:240px;text-decoration:none;color:#222;font-size:13px}
.overview img{display:block;max-width:240px;max-height:240px;border:1px solid #ccc}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:14px;margin:0 0 24px}
.card h2{font-size:17px;margin:0 0 6px}.facts{color:#555;font-size:13px;margin:0 0 8px}
.figure{position:relative;display:inline-block;max-width:100%}.figure>img{display:block;max-width:100%}
.layers{position:absolute;left:0;top:0;width:100%;height:100%;opacity:.85}
.layers img{position:absolute;left:0;top:0;width:100%;height:100%}
[hidden]{display:none!important}.controls{margin:8px 0}.controls label{margin-right:14px}
table{border-collapse:collapse;font-size:13px;margin-top:6px}td{padding:2px 10px 2px 0}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:middle}
"""

SCRIPT = """
(function () {
  var match = location.hash.match(/hide=([0-9,]*)/);
  var hidden = match ? match[1].split(",").filter(Boolean) : [];
  document.querySelectorAll(".card").forEach(function (card) {
    var layers = card.querySelector(".layers");
    var slider = card.querySelector("input.opacity");
    slider.addEventListener("input", function () { layers.style.opacity = slider.value / 100; });
    var button = card.querySelector("button.before");
    button.addEventListener("click", function () {
      layers.hidden = !layers.hidden;
      button.textContent = layers.hidden ? "show damage" : "hide damage";
    });
    card.querySelectorAll("input.class").forEach(function (box) {
      var layer = card.querySelector('.layers img[data-class="' + box.dataset.class + '"]');
      if (hidden.indexOf(box.dataset.class) >= 0) { box.checked = false; }
      var apply = function () { layer.hidden = !box.checked; };
      box.addEventListener("change", apply);
      apply();
    });
  });
  window.addEventListener("load", function () {
    var images = document.images, loaded = 0;
    for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) { loaded++; } }
    document.body.dataset.images = images.length;
    document.body.dataset.loaded = loaded;
    document.body.dataset.cards = document.querySelectorAll(".card").length;
    console.log("gallery ready: " + document.body.dataset.cards + " cards, " + loaded + "/" + images.length + " images");
  });
})();
"""


def _share(percent, mm2):
    return percent_text(percent) + ("" if mm2 is None else f", {area_text(mm2)}")


def _legend_rows(report, pictures, scheme):
    rows = []
    for entry in report["classes"]:
        if entry["id"] not in pictures["layers"]:
            continue
        colour = "#%02x%02x%02x" % tuple(scheme.colours[entry["id"]])
        rows.append(f'<tr><td><label><input type="checkbox" class="class" data-class="{entry["id"]}" checked> '
                    f'<span class="swatch" style="background:{colour}"></span> {html.escape(entry["name"])}</label>'
                    f'</td><td>{_share(entry["percent"], entry["mm2"])}</td>'
                    f'<td>{"" if entry["iou"] is None else "IoU %.3f" % entry["iou"]}</td></tr>')
    if scheme.ignore in pictures["layers"]:
        colour = "#%02x%02x%02x" % tuple(scheme.ignore_colour)
        rows.append(f'<tr><td><label><input type="checkbox" class="class" data-class="{scheme.ignore}" checked> '
                    f'<span class="swatch" style="background:{colour}"></span> Outside object</label></td>'
                    '<td></td><td></td></tr>')
    return "".join(rows)


def _card(index, report, pictures, scheme):
    facts = [f"{report['width']} x {report['height']} px", f"object: {html.escape(report['object_source'])}",
             f"scale: {html.escape(report['scale']['source'])}"]
    if report.get("miou") is not None:
        facts.append(f"mIoU vs truth {100 * report['miou']:.1f} %")
    layers = "".join(f'<img src="{html.escape(path)}" data-class="{class_id}" alt="">'
                     for class_id, path in pictures["layers"].items())
    links = " · ".join(f'<a href="{html.escape(report["outputs"][key])}">{text}</a>' for key, text in
                       (("overlay", "full-size overlay"), ("mask", "full-size mask"), ("report", "report")))
    return (f'<section class="card" id="card-{index}"><h2>{html.escape(report["file"])} — damaged '
            f'{_share(report["damaged_percent"], report["damaged_mm2"])} of the object</h2>'
            f'<p class="facts">{" · ".join(facts)}</p>'
            f'<div class="figure"><img src="{html.escape(pictures["view"])}" alt="{html.escape(report["file"])}">'
            f'<div class="layers">{layers}</div></div>'
            f'<div class="controls"><label>damage opacity <input type="range" class="opacity" min="0" max="100" '
            f'value="85"></label><button class="before">hide damage</button></div>'
            f'<table>{_legend_rows(report, pictures, scheme)}</table><p>{links}</p></section>')


def write_page(out, cards, scheme, title):
    """out/index.html over (report, pictures) pairs, in order."""
    overview = "".join(f'<a href="#card-{i}"><img src="{html.escape(pictures["thumb"])}" alt=""><span>'
                       f'{html.escape(report["file"])} · {percent_text(report["damaged_percent"])}</span></a>'
                       for i, (report, pictures) in enumerate(cards))
    body = "".join(_card(i, report, pictures, scheme) for i, (report, pictures) in enumerate(cards))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>'
            f'<p class="facts">{len(cards)} images; classes: '
            f'{html.escape(", ".join(f"{i} {n}" for i, n in enumerate(scheme.names)))}. Open with '
            f'#hide=ID,ID to start with classes hidden.</p><div class="overview">{overview}</div>{body}'
            f'<script>{SCRIPT}</script></body></html>\n')
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
