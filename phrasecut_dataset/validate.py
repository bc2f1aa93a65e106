"""Checks on raw PhraseCut files, and the one error they raise.

Every problem found in the raw data becomes a `PhraseCutFormatError` that names the file or task,
says what is wrong and what to do. Problems confined to one image or one task carry a `reason`, so
that the builder's `skip_bad=True` can skip them and count them by reason instead of stopping.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipseg_tools.errors import CommandError

SKIP_HINT = "pass skip_bad=True to skip and count such entries"

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


def check_image_entry(entry: Any, where: str) -> dict:
    """Validate one image_data_split.json entry; returns {image_id, width, height, coco_id}."""
    _require_fields(entry, IMAGE_FIELDS, where)
    width, height = entry["width"], entry["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise PhraseCutFormatError(
            f"{where}: width/height must be positive integers, found {width!r} x {height!r}; {SKIP_HINT}.",
            "bad_field",
        )
    return {"image_id": entry["image_id"], "width": width, "height": height, "coco_id": entry.get("coco_id")}


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
        image = Image.open(io.BytesIO(data))
        actual = image.size
        # Decoding at 1/8 scale (JPEG DCT scaling) still reads every byte, so truncation shows up, at a
        # fraction of the cost of a full decode.
        image.draft("RGB", (max(1, actual[0] // 8), max(1, actual[1] // 8)))
        image.load()
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
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


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
            xs, ys = points[:, 0].astype(np.int64), points[:, 1].astype(np.int64)  # the rasteriser's int()
            if xs.max() < 0 or ys.max() < 0 or xs.min() >= width or ys.min() >= height:
                raise PhraseCutFormatError(
                    f"{label} lies entirely outside the {width}x{height} image; {SKIP_HINT}.",
                    "polygon_outside_image",
                )
            arrays.append(points)
        instances.append(arrays)
    return instances


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
