"""Task masks drawn from their polygons the way PhraseCut's own evaluator draws them.

The builder draws them to size each task's subsets; training, evaluation and the gallery draw the same masks
from the prepared rows (`clipseg_tools.batching.row_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


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
