"""Checks on raw PhraseCut files, and the one error they raise.

Every problem found in the raw data becomes a `PhraseCutFormatError` that names the file or task,
says what is wrong and what to do. Problems confined to one image or one task carry a `reason`, so
that the builder's `skip_bad=True` can skip them and count them by reason instead of stopping.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipseg_tools.errors import CommandError

# Said to command-line users (the scripts' flag) and to Python users (the builder's keyword) alike.
SKIP_HINT = "pass --skip_bad_samples (skip_bad=True in Python) to skip and count such entries"

# A vertex may lie outside its image (annotations overshoot the border), but not by more than this many image
# sides beyond an edge: such a value is no annotation of this image but a broken number (1e12 made PIL's
# rasteriser draw a mask 50 pixels off; it is exact far beyond this bound).
VERTEX_MARGIN = 1.0
INT64 = (-(2**63), 2**63 - 1)

TASK_FIELDS = ("task_id", "image_id", "ann_ids", "Polygons", "instance_boxes", "phrase", "phrase_structure")
STRUCTURE_FIELDS = ("name", "attributes", "relation_ids", "relation_descriptions", "type")
IMAGE_FIELDS = ("image_id", "width", "height")


class PhraseCutFormatError(CommandError, ValueError):
    """Raw PhraseCut data (or an argument pointing at it) is wrong; the message says where and what to do.
    A command ends on it with that one sentence (exit code 2), as on any bad input.

    `reason` is a short key ("missing_image", "polygon_too_few_points", ...) when the problem is
    confined to one image or task and can be skipped with `skip_bad=True`; None otherwise.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def read_json(path: Path, what: str) -> Any:
    """Load a JSON file, turning a missing or malformed file into a clear error."""
    if not path.is_file():
        raise PhraseCutFormatError(
            f"{path}: file not found ({what}). Check that data_dir is the PhraseCut folder."
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PhraseCutFormatError(
            f"{path}: not valid JSON ({error}); re-download or regenerate this file."
        ) from None


def read_json_list(path: Path, what: str) -> list:
    """Load a JSON file whose top level must be a list (refer_*.json, image_data_split.json)."""
    data = read_json(path, what)
    if not isinstance(data, list):
        raise PhraseCutFormatError(
            f"{path}: expected a JSON list at the top level ({what}), found {type(data).__name__}."
        )
    return data


def _require_fields(entry: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise PhraseCutFormatError(
            f"{where}: expected a JSON object, found {type(entry).__name__}; {SKIP_HINT}.", "bad_field"
        )
    missing = [name for name in fields if name not in entry]
    if missing:
        raise PhraseCutFormatError(
            f"{where}: missing field(s) {', '.join(missing)}; {SKIP_HINT}.", "missing_field"
        )


def _is_int64(value: Any) -> bool:
    """An integer (not a bool) that fits the int64 columns it is written to."""
    return isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]


def check_image_entry(entry: Any, where: str) -> dict:
    """Validate one image_data_split.json entry; returns {image_id, width, height, coco_id}."""
    _require_fields(entry, IMAGE_FIELDS, where)
    width, height = entry["width"], entry["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise PhraseCutFormatError(
            f"{where}: width/height must be positive integers, found {width!r} x {height!r}; {SKIP_HINT}.",
            "bad_field",
        )
    coco_id = entry.get("coco_id")
    if coco_id is not None and not _is_int64(coco_id):  # else the Arrow writer fails without naming it
        raise PhraseCutFormatError(
            f"{where}: 'coco_id' must be an integer or null, found {coco_id!r}; {SKIP_HINT}.", "bad_field"
        )
    return {"image_id": entry["image_id"], "width": width, "height": height, "coco_id": coco_id}


def read_image_bytes(path: Path, width: int, height: int, task_hint: str) -> bytes:
    """Read an image file and make sure it decodes completely at the size the metadata gives."""
    where = f"{path} ({task_hint})"
    if not path.is_file():
        raise PhraseCutFormatError(
            f"{where}: image file is missing. Check that data_dir/images holds <image_id>.jpg files, "
            f"or {SKIP_HINT}.",
            "missing_image",
        )
    data = path.read_bytes()
    try:
        # Over Image.MAX_IMAGE_PIXELS Pillow only warns (over twice that it raises): refused at the warning
        # already, as no PhraseCut image comes near it and training would decode the whole image again.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            actual = image.size
            # Decoding at 1/8 scale (JPEG DCT scaling) still reads every byte, so truncation shows up, at a
            # fraction of the cost of a full decode.
            image.draft("RGB", (max(1, actual[0] // 8), max(1, actual[1] // 8)))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        pixels = re.search(r"\d+", str(error))  # Pillow's message starts with the image's pixel count
        raise PhraseCutFormatError(
            f"{where}: the image has {pixels.group() if pixels else 'too many'} pixels, over Pillow's size limit "
            f"of {Image.MAX_IMAGE_PIXELS} (a possible decompression bomb); replace it, raise "
            f"PIL.Image.MAX_IMAGE_PIXELS if you trust it, or {SKIP_HINT}.",
            "image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise PhraseCutFormatError(
            f"{where}: not an image file; replace it or {SKIP_HINT}.", "not_an_image"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise PhraseCutFormatError(
            f"{where}: image file is truncated or corrupt ({error}); re-download it or {SKIP_HINT}.",
            "corrupt_image",
        ) from None
    if actual != (width, height):
        raise PhraseCutFormatError(
            f"{where}: the JPEG is {actual[0]}x{actual[1]} but image_data_split.json says {width}x{height}, "
            f"so its polygons would not line up; {SKIP_HINT}.",
            "size_mismatch",
        )
    return data


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int64(v) for v in value)


def _valid_unicode(text: str) -> bool:
    """False for a string that holds a lone surrogate (a JSON escape such as "\\ud800"): it cannot be written as
    UTF-8, so the Arrow writer would fail on it without naming the task."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _check_polygons(polygons: Any, width: int, height: int, where: str) -> list[list[np.ndarray]]:
    """Polygons -> instances of float64 arrays [N, 2]; rejects malformed, degenerate or off-image polygons."""
    if not isinstance(polygons, list) or not polygons:
        raise PhraseCutFormatError(
            f"{where}: 'Polygons' must be a non-empty list of instances; {SKIP_HINT}.", "bad_polygon"
        )
    instances = []
    for i, instance in enumerate(polygons):
        if not isinstance(instance, list) or not instance:
            raise PhraseCutFormatError(
                f"{where}: instance {i} must be a non-empty list of polygons; {SKIP_HINT}.", "bad_polygon"
            )
        arrays = []
        for k, polygon in enumerate(instance):
            label = f"{where}: polygon {k} of instance {i}"
            if not isinstance(polygon, list) or not all(_number_list(p, 2) for p in polygon):
                raise PhraseCutFormatError(
                    f"{label} must be a list of [x, y] number pairs; {SKIP_HINT}.", "bad_polygon"
                )
            if len(polygon) < 3:
                raise PhraseCutFormatError(
                    f"{label} has {len(polygon)} point(s), fewer than three; {SKIP_HINT}.",
                    "polygon_too_few_points",
                )
            # Kept as the JSON has them (float64): the rasteriser truncates each vertex, and a vertex just below an
            # integer (115.99999999999999, from PhraseCut's own k/600*width) would round up in float32.
            points = np.asarray(polygon, dtype=np.float64)
            _check_vertices_near(points, width, height, label)
            xs, ys = points[:, 0].astype(np.int64), points[:, 1].astype(np.int64)  # the rasteriser's int()
            if xs.max() < 0 or ys.max() < 0 or xs.min() >= width or ys.min() >= height:
                raise PhraseCutFormatError(
                    f"{label} lies entirely outside the {width}x{height} image; {SKIP_HINT}.",
                    "polygon_outside_image",
                )
            arrays.append(points)
        instances.append(arrays)
    return instances


def _check_vertices_near(points: np.ndarray, width: int, height: int, label: str) -> None:
    """Refuse a vertex more than VERTEX_MARGIN image sides beyond the image's edges (checked in float, before
    any cast to integers could overflow)."""
    low = -VERTEX_MARGIN * np.array([width, height])
    high = (1 + VERTEX_MARGIN) * np.array([width, height])
    outside = np.nonzero(((points < low) | (points > high)).any(axis=1))[0]
    if len(outside):
        x, y = points[outside[0]]
        raise PhraseCutFormatError(
            f"{label} has vertex {outside[0]} at ({x:g}, {y:g}), far outside the {width}x{height} image (more than "
            f"{VERTEX_MARGIN:g} image side beyond its edge): a broken coordinate; {SKIP_HINT}.",
            "polygon_far_outside_image",
        )


def _check_text(task: Mapping, structure: Mapping, relations: list, where: str) -> None:
    """The phrase must say something, and every string written must be valid Unicode."""
    if not task["phrase"].strip():
        raise PhraseCutFormatError(
            f"{where}: empty phrase (a model would learn this region without a word); {SKIP_HINT}.",
            "empty_phrase",
        )
    texts = [str(task["task_id"]), task["phrase"], structure["name"], str(structure["type"])]
    texts += [*structure["attributes"], *(s for relation in relations for s in relation)]
    bad = next((text for text in texts if not _valid_unicode(text)), None)
    if bad is not None:
        raise PhraseCutFormatError(
            f"{where}: the text {bad!r} holds a lone surrogate (a broken \\uXXXX escape), not valid Unicode; "
            f"{SKIP_HINT}.",
            "bad_text",
        )


def check_task(task: Any, width: int, height: int, where: str) -> dict:
    """Validate one refer_*.json entry against its image's size; returns the normalised task fields."""
    if isinstance(task, Mapping) and "task_id" in task:
        where = f"{where} (task {task['task_id']})"
    _require_fields(task, TASK_FIELDS, where)
    structure = task["phrase_structure"]
    _require_fields(structure, STRUCTURE_FIELDS, f"{where}: phrase_structure")
    if not isinstance(task["phrase"], str) or not isinstance(structure["name"], str):
        raise PhraseCutFormatError(
            f"{where}: 'phrase' and phrase_structure 'name' must be strings; {SKIP_HINT}.", "bad_field"
        )
    relations = structure["relation_descriptions"]
    if not isinstance(relations, list) or not all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(s, str) for s in r) for r in relations
    ):
        raise PhraseCutFormatError(
            f"{where}: relation_descriptions must be a list of [predicate, object] string pairs; {SKIP_HINT}.",
            "bad_field",
        )
    if not _string_list(structure["attributes"]):
        raise PhraseCutFormatError(
            f"{where}: 'attributes' must be a list of strings; {SKIP_HINT}.", "bad_field"
        )
    if not (_int_list(task["ann_ids"]) and _int_list(structure["relation_ids"])):
        raise PhraseCutFormatError(
            f"{where}: 'ann_ids' and 'relation_ids' must be lists of integers; {SKIP_HINT}.", "bad_field"
        )
    _check_text(task, structure, relations, where)

    instances = _check_polygons(task["Polygons"], width, height, where)
    boxes = task["instance_boxes"]
    if (
        not isinstance(boxes, list)
        or len(boxes) != len(instances)
        or not all(_number_list(b, 4) for b in boxes)
    ):
        raise PhraseCutFormatError(
            f"{where}: instance_boxes must hold one [x, y, w, h] per instance ({len(instances)}); {SKIP_HINT}.",
            "bad_instance_boxes",
        )
    return {
        "task_id": str(task["task_id"]),
        "phrase": task["phrase"],
        "phrase_structure": {
            "name": structure["name"],
            "attributes": list(structure["attributes"]),
            "relation_ids": list(structure["relation_ids"]),
            "relation_descriptions": [{"predicate": p, "object": o} for p, o in relations],
            "type": str(structure["type"]),
        },
        "polygons": instances,
        "instance_boxes": np.asarray(boxes, dtype=np.float64),
        "ann_ids": list(task["ann_ids"]),
    }
