"""Images and masks: the official polygon rasteriser and the model-side transforms.

Training, evaluation and the failure gallery all go through these functions, so the pixels a model
sees and the masks it is scored against are made one way only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageDraw

# CLIPSeg normalises with the ImageNet statistics (not CLIP's own), and so does the processor
# shipped with the CIDAS checkpoints.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_point(value: Any) -> bool:
    """True for an [x, y] pair of numbers (list, tuple or array)."""
    return len(value) == 2 and all(np.isscalar(v) for v in value)


def _flat_polygons(polygons: Sequence) -> list:
    """Accept a task's nested `polygons` (instances -> polygons -> points) or a flat list of polygons."""
    flat = []
    for item in polygons:
        if len(item) and _is_point(item[0]):  # item is already a polygon (a list of points)
            flat.append(item)
        else:  # item is an instance: a list of polygons
            flat.extend(item)
    return flat


def polygons_to_mask(polygons: Sequence, height: int, width: int) -> np.ndarray:
    """Rasterise a task's region: the union of every polygon of every instance, as PhraseCut's evaluator does.

    `polygons` is the task's nested list (instances -> polygons -> [x, y] points); a flat list of
    polygons is accepted too. Returns a bool array of shape (height, width).

    Convention (the official one, PhraseCutDataset `utils/data_transfer.py::polygons_to_mask`):
    each vertex is truncated toward zero with int(), the polygon is drawn with PIL
    `ImageDraw.polygon(..., outline=1, fill=1)` so boundary pixels count, polygons with fewer than
    two points are ignored, and the result is the union over all polygons. PIL clips what falls
    outside the canvas. Drawing every polygon on one canvas gives the same union as the official
    sum-then-threshold, in one pass.
    """
    canvas = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in _flat_polygons(polygons):
        if len(polygon) < 2:
            continue
        draw.polygon([(int(x), int(y)) for x, y in polygon], outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def resize_image(image: Image.Image, size: int) -> Image.Image:
    """Convert to RGB and squash the whole image to size x size with PIL bilinear (no crop, as in CLIPSeg).
    An RGB image already of that size (a crop of an image stored at the model's size) is returned as is:
    two copies fewer per training sample."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.BILINEAR)


def resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """`resize_image` for an RGB uint8 array [H, W, 3] (the same PIL bilinear resize, the same pixels); an
    array already size x size is returned as is."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.array(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def image_to_tensor(
    image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """An RGB PIL image -> float32 tensor [3, H, W]: divided by 255, then normalised with mean and std."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _nearest_indices(source: int, target: int) -> np.ndarray:
    # Pixel-centre aligned nearest neighbour (torch's "nearest-exact"): the same geometry as the
    # bilinear image resize, so a resized mask stays on top of its resized image.
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask [H, W] (or a stack [K, H, W]) to size x size or (height, width).
    A mask already of that size is returned as is."""
    height, width = (size, size) if isinstance(size, int) else size
    if mask.shape[-2:] == (height, width):
        return mask
    rows = _nearest_indices(mask.shape[-2], height)
    cols = _nearest_indices(mask.shape[-1], width)
    # Two 1-D gathers: several times faster than one 2-D fancy index.
    return np.take(np.take(mask, rows, axis=-2), cols, axis=-1)


def decode_image(image_cell: Any) -> Image.Image:
    """Turn a `datasets` Image cell into an RGB PIL image.

    Accepts what a dataset row can hold: a decoded PIL image, a `{"bytes": ..., "path": ...}` dict
    (an `Image(decode=False)` column or a Parquet row), raw bytes, or a file path.
    """
    data = _encoded_bytes(image_cell)
    if isinstance(image_cell, Image.Image):
        image = image_cell
    elif data is not None:
        image = Image.open(io.BytesIO(data))
    else:
        image = Image.open(image_cell["path"] if isinstance(image_cell, Mapping) else image_cell)
    if image.mode == "RGB":
        image.load()  # decode now (errors surface here) and close the file; convert would also copy
        return image
    return image.convert("RGB")


def _encoded_bytes(image_cell: Any) -> bytes | bytearray | None:
    """The encoded bytes an image cell holds (a `{"bytes": ...}` dict or raw bytes), else None."""
    if isinstance(image_cell, Mapping):
        return image_cell.get("bytes")
    return image_cell if isinstance(image_cell, (bytes, bytearray)) else None


def decode_pixels(image_cell: Any) -> np.ndarray:
    """`decode_image` as a writable RGB uint8 array [H, W, 3], for the training and evaluation samples.

    A JPEG in YCbCr or grey (what PhraseCut's images are) is decoded by libjpeg-turbo through simplejpeg,
    straight into the array: about a quarter less CPU than Pillow's decode plus its copy out of the image,
    and the same pixels (both use libjpeg-turbo's accurate DCT and smooth upsampling; tested). Anything else
    (CMYK, PNG, a path, a PIL image, a JPEG simplejpeg refuses) goes through Pillow, which names what it
    cannot decode.
    """
    data = _encoded_bytes(image_cell)
    if data is not None and data[:2] == b"\xff\xd8":
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass
    return np.array(decode_image(image_cell))


def row_masks(row: Mapping, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Masks of all the tasks of one dataset row: bool array [K, H, W], in the row's task order.

    Each mask is rasterised at the image's native size (row["height"], row["width"]) with the
    official convention, then, when `height`/`width` are given, resized to them by nearest neighbour.
    Pair it with `decode_image` so that a transform decodes each image once for all of its phrases.
    """
    native_height, native_width = int(row["height"]), int(row["width"])
    tasks = row["tasks"]
    masks = np.zeros((len(tasks), native_height, native_width), dtype=bool)
    for k, task in enumerate(tasks):
        masks[k] = polygons_to_mask(task["polygons"], native_height, native_width)
    target = (height or native_height, width or native_width)
    if target != (native_height, native_width):
        masks = resize_mask(masks, target)
    return masks
