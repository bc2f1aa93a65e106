"""Training images stored at the model's size: a one-off `datasets.map` that makes the data path cheaper.

Training decodes a JPEG and resizes it for every phrase it draws; at GPU speed that CPU work is the
bottleneck (PhraseCut images are about 500x375, the model reads 352x352). Shrinking every image once so its
short side is the model's size, with its polygons and boxes scaled to match, leaves each sample a smaller
decode and no resize: the square crop of side min(height, width) is then already model-sized. The geometry is
the same as cropping the full image and resizing the crop; pixel values differ by one JPEG re-encoding
(quality 95) and the order of the two resamplings. Masks are rasterised from the scaled polygons with the
official rule, so their edges can differ by a pixel from native masks resized. For training only: evaluation
keeps the native images and masks of the official protocol.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from .masks import decode_image


def shrink_images(dataset: Any, short_side: int, quality: int = 95, num_proc: int | None = None) -> Any:
    """The dataset with images larger than `short_side` (on their short side) shrunk to it, polygons and
    boxes scaled with them. `datasets` caches the result next to the source's cache files."""
    if short_side < 1:
        raise ValueError(f"short_side must be positive, got {short_side}")
    return dataset.map(
        shrink_row,
        fn_kwargs={"short_side": short_side, "quality": quality},
        num_proc=num_proc,
        desc=f"shrinking training images to a short side of {short_side}",
    )


def shrink_row(row: dict, short_side: int, quality: int = 95) -> dict:
    width, height = int(row["width"]), int(row["height"])
    if min(width, height) <= short_side:
        return row
    if width <= height:
        new_width, new_height = short_side, round(height * short_side / width)
    else:
        new_width, new_height = round(width * short_side / height), short_side
    image = decode_image(row["image"]).resize((new_width, new_height), Image.BILINEAR)
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=quality)
    sx, sy = new_width / width, new_height / height
    tasks = [
        {
            **task,
            "polygons": [
                [[[x * sx, y * sy] for x, y in polygon] for polygon in instance]
                for instance in task["polygons"]
            ],
            "instance_boxes": [[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in task["instance_boxes"]],
        }
        for task in row["tasks"]
    ]
    return {
        "image": {"bytes": encoded.getvalue(), "path": None},
        "width": new_width,
        "height": new_height,
        "tasks": tasks,
    }
