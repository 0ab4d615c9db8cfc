"""Everything between damage-segmentation files on disk and a batch on the device."""
import collections
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = 16
IGNORE_INDEX = 255
CLASS_NAMES = ["Clean", "Material loss", "Peel", "Dust", "Scratch", "Hair", "Dirt", "Fold", "Writing",
               "Cracks", "Staining", "Stamp", "Sticker", "Puncture", "Burn marks", "Lightleak"]
PALETTE = [(0, 0, 0), (0x1C, 0xE6, 0xFF), (0xFF, 0x34, 0xFF), (0xFF, 0x4A, 0x46), (0x00, 0x89, 0x41),
           (0x00, 0x6F, 0xA6), (0xA3, 0x00, 0x59), (0xFF, 0xA5, 0x00), (0x7A, 0x49, 0x00), (0x00, 0x00, 0xA6),
           (0x63, 0xFF, 0xAC), (0x00, 0x4D, 0x43), (0x8F, 0xB0, 0xFF), (0x99, 0x7D, 0x87), (0x80, 0x96, 0x93),
           (0xF6, 0xFF, 0x1B)]
BACKGROUND_COLOUR = (0x5A, 0x00, 0x07)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

Sample = collections.namedtuple("Sample", "id image mask")


class UserError(Exception):
    """A one-line, user-fixable problem; the message names the file or flag and the fix."""


def _stems(folder):
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in files:
                raise UserError(f"{path}: two files share the id {path.stem!r} ({files[path.stem].name}); keep one")
            files[path.stem] = path
    return files


def list_samples(root):
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "annotations"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: not found; a dataset folder needs images/ and annotations/ "
                            "with matching file names")
    images, masks = _stems(image_dir), _stems(mask_dir)
    if not images and not masks:
        raise UserError(f"{root}: no images in images/ or annotations/ (png/jpg/tif); add image/mask pairs")
    for stem in sorted(images.keys() - masks.keys()):
        raise UserError(f"{images[stem]}: image has no mask; add annotations/{stem}.png or remove the image")
    for stem in sorted(masks.keys() - images.keys()):
        raise UserError(f"{masks[stem]}: mask has no image; add images/{stem}.png or remove the mask")
    return [Sample(stem, images[stem], masks[stem]) for stem in sorted(images)]


def _open(path):
    try:
        image = Image.open(path)
        image.load()
        return image
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({exc}); re-export or remove it") from None


def read_image(path):
    image = _open(path)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


_COLOUR_TO_ID = {colour: index for index, colour in enumerate(PALETTE)} | {BACKGROUND_COLOUR: IGNORE_INDEX}


def _mask_from_colours(path, rgb):
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    ids = np.empty(len(colours), dtype=np.uint8)
    unknown = []
    for i, value in enumerate(colours.tolist()):
        colour = (value >> 16, (value >> 8) & 255, value & 255)
        if colour not in _COLOUR_TO_ID:
            unknown.append("#%02X%02X%02X" % colour)
        else:
            ids[i] = _COLOUR_TO_ID[colour]
    if unknown:
        raise UserError(f"{path}: colour mask has colours outside the ARTeFACT palette ({', '.join(unknown[:5])}); "
                        "save the single-channel id mask instead")
    return ids[inverse.reshape(packed.shape)]


def read_mask(path, image_size=None):
    """Masks are class ids in one channel. Palette (P) masks are taken as their indices, not their colours:
    that is how ARTeFACT and most tools store id masks. RGB/RGBA masks must use the ARTeFACT colours
    (background #5A0007 -> 255). 16-bit masks are accepted only when every value is a valid id."""
    image = _open(path)
    if image.mode in ("L", "P"):
        mask = np.asarray(image, dtype=np.uint8)
    elif image.mode in ("RGB", "RGBA"):
        rgba = np.asarray(image)
        if image.mode == "RGBA" and (rgba[..., 3] != 255).any():
            raise UserError(f"{path}: colour mask has transparent pixels; save it without alpha or as ids")
        mask = _mask_from_colours(path, rgba[..., :3])
    elif image.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        wide = np.asarray(image).astype(np.int64)
        mask = _checked(path, wide).astype(np.uint8)
    else:
        raise UserError(f"{path}: mask mode {image.mode} is not supported; save ids as 8-bit single-channel PNG")
    mask = _checked(path, mask)
    if image_size is not None and tuple(image_size) != (mask.shape[1], mask.shape[0]):
        raise UserError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                        f"{image_size[0]}x{image_size[1]}; masks must match their image size")
    return mask


def _checked(path, mask):
    values = np.unique(mask)
    bad = values[(values >= NUM_CLASSES) & (values != IGNORE_INDEX)]
    if len(bad):
        shown = ", ".join(str(v) for v in bad[:8].tolist()) + (", ..." if len(bad) > 8 else "")
        raise UserError(f"{path}: label values {shown} are outside 0-{NUM_CLASSES - 1} and {IGNORE_INDEX}; "
                        "fix the mask (ids, not colours)")
    return mask
