"""What a damage map measures: pixels, % of the object and mm² of each class of the label scheme, the scale
they are measured in (and where it came from), scores against a ground truth, and the rows of areas.csv and
scores.csv (one row per image)."""
import numpy as np
import torch

from metrics import confusion, iou_report

MM_PER_INCH = 25.4
# Resolutions that software writes when nobody measured anything (camera firmware, screen captures, Pillow's
# JPEG fallback): taken as "no scale", never as 72 pixels per inch of the object.
PLACEHOLDER_DPI = (72.0, 96.0)
ROWS_PER_CHUNK = 512


def pixel_scale(dpi, px_per_mm=None):
    """{"px_per_mm": [x, y] or None, "mm2_per_pixel": area of one pixel or None, "source": where it came from}:
    --px-per-mm when given, else the file's resolution (dpi: (x, y) dots per inch as files.image_header reads
    it) unless it has none, one below 2 dpi, or a software default (72 or 96 dpi)."""
    if px_per_mm:
        return {"px_per_mm": [px_per_mm, px_per_mm], "mm2_per_pixel": 1 / px_per_mm ** 2,
                "source": f"--px-per-mm {px_per_mm:g}"}
    if dpi is None or min(dpi) < 2:
        return {"px_per_mm": None, "mm2_per_pixel": None,
                "source": "none (the file states no resolution; pass --px-per-mm)"}
    if all(min(abs(v - p) for p in PLACEHOLDER_DPI) < 0.5 for v in dpi):
        return {"px_per_mm": None, "mm2_per_pixel": None, "source": f"none (the file's {dpi[0]:.0f} dpi is a "
                "software default, not a measurement; pass --px-per-mm)"}
    x, y = (v / MM_PER_INCH for v in dpi)
    return {"px_per_mm": [round(x, 4), round(y, 4)], "mm2_per_pixel": 1 / (x * y),
            "source": f"file resolution ({round(dpi[0], 1):g} x {round(dpi[1], 1):g} dpi)"}


def _mm2(pixels, scale):
    return None if scale is None or scale["mm2_per_pixel"] is None else round(pixels * scale["mm2_per_pixel"], 3)


def measured(counts, scheme, scale=None, cm=None):
    """The area report of one image from its class pixel counts inside the object (counts[c]: pixels labelled
    c): per class pixels, % of the object and mm² (with a scale), damaged pixels (every class but the clean
    one); with cm, the confusion matrix (rows truth, columns prediction) over the pixels a truth scores, the
    IoU per class (None where a class is in neither), mIoU over the others and the damage-vs-clean IoU."""
    counts = [int(v) for v in counts[:scheme.num_classes]]
    object_pixels = sum(counts)
    damaged = object_pixels - counts[scheme.clean]
    classes = [{"id": class_id, "name": name, "pixels": counts[class_id],
                "percent": round(100 * counts[class_id] / max(object_pixels, 1), 4), "mm2": _mm2(counts[class_id], scale),
                "iou": None} for class_id, name in enumerate(scheme.names)]
    report = {"object_pixels": object_pixels, "damaged_pixels": damaged,
              "damaged_percent": round(100 * damaged / max(object_pixels, 1), 4), "damaged_mm2": _mm2(damaged, scale),
              "classes": classes}
    if cm is not None:
        scores = iou_report(cm, scheme.names, scheme.clean)
        for entry in classes:
            iou = scores["iou"][entry["name"]]
            entry["iou"] = None if iou is None else round(iou, 6)
        defined = [iou for iou in scores["iou"].values() if iou is not None]
        report.update(scored_pixels=int(cm.sum()), miou=round(scores["miou"], 6) if defined else None,
                      damage_iou=None if scores["binary_iou"] is None else round(scores["binary_iou"], 6),
                      confusion=cm.tolist())
    return report


def label_counts(labels):
    """Pixels of every value 0..255 in a uint8 label map."""
    return np.bincount(labels.ravel(), minlength=256)


def area_report(labels, scheme, truth=None, scale=None):
    """measured() of a whole label map (the ignore id outside the object), scored against truth (ids, the
    ignore id outside what it scores) when given."""
    cm = None
    if truth is not None:
        cm = torch.zeros(scheme.num_classes, scheme.num_classes, dtype=torch.long)
        # Row chunks keep the int64 temporaries small for 100+ megapixel images.
        for r0 in range(0, labels.shape[0], ROWS_PER_CHUNK):
            cm += confusion(torch.from_numpy(labels[r0:r0 + ROWS_PER_CHUNK].astype(np.int64)),
                            torch.from_numpy(truth[r0:r0 + ROWS_PER_CHUNK].astype(np.int64)), scheme.num_classes,
                            scheme.ignore)
    return measured(label_counts(labels), scheme, scale, cm)


def areas_fields(scheme):
    """areas.csv's columns: the image, its size and object, the scale, total damage, then each class."""
    per_class = [f"{name} {unit}" for name in scheme.names for unit in ("px", "%", "mm2")]
    return ["file", "width", "height", "object_pixels", "object_source", "damage_px", "damage_%", "damage_mm2",
            "px_per_mm", "scale_source", *per_class]


def _blank(value):
    return "" if value is None else value


def areas_row(report, scheme):
    row = {"file": report["file"], "width": report["width"], "height": report["height"],
           "object_pixels": report["object_pixels"], "object_source": report["object_source"],
           "damage_px": report["damaged_pixels"], "damage_%": report["damaged_percent"],
           "damage_mm2": _blank(report["damaged_mm2"]),
           "px_per_mm": "" if report["scale"]["px_per_mm"] is None else " x ".join(map(str, report["scale"]["px_per_mm"])),
           "scale_source": report["scale"]["source"]}
    for entry in report["classes"]:
        row.update({f"{entry['name']} px": entry["pixels"], f"{entry['name']} %": entry["percent"],
                    f"{entry['name']} mm2": _blank(entry["mm2"])})
    return row


def scores_fields(scheme):
    """scores.csv's columns (with --truth): the image, its truth mask, the pixels scored, mIoU, damage IoU,
    then each class's IoU (empty where the class is in neither map)."""
    return ["file", "truth", "scored_pixels", "mIoU", "damage_IoU", *(f"{name} IoU" for name in scheme.names)]


def scores_row(report, scheme):
    row = {"file": report["file"], "truth": report["truth"], "scored_pixels": report["scored_pixels"],
           "mIoU": _blank(report["miou"]), "damage_IoU": _blank(report["damage_iou"])}
    row.update({f"{entry['name']} IoU": _blank(entry["iou"]) for entry in report["classes"]})
    return row
