"""A user's own segmentation data in the project's one-row-per-image form, so that training and evaluation
treat it as they treat PhraseCut (one vision pass per image for all its prompts, negatives, PC+ example
images, exact resume, several processes).

Referring rows: an image column, a mask column (a binary `Image`, or a list of them) and a prompt column (a
string per mask, or a list of strings per mask: one task per mask, its first prompt the one scored, each
training sample drawing one of them). Each mask is stored as a
1-bit PNG beside the image (`mask` of a task; PhraseCut's tasks carry polygons instead). The conversion runs
once with `datasets.map` over several processes and is cached by `datasets` like any map.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from PIL import Image, ImageOps

from .errors import CommandError

_POINT = datasets.List(datasets.Value("float64"), length=2)


def row_features(class_names: list[str] | None = None) -> datasets.Features:
    """The project's row form for a user's data, as run_train.py and run_eval.py read it (PhraseCut's rows carry
    polygons and more fields instead of masks). `ignore` is a 1-bit PNG of the pixels no prompt of the image is
    trained or scored on (a semantic data set's ignore index, COCO's crowd regions), empty when there are none.
    With `class_names` (semantic and COCO data), each task's `class_id` names its class (a `ClassLabel`, so the
    names travel with the rows); referring rows have -1 there."""
    class_id = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int32")
    return datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "image_id": datasets.Value("int64"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "ignore": datasets.Value("binary"),
            "tasks": datasets.List(
                {
                    "task_id": datasets.Value("string"),
                    "phrase": datasets.Value("string"),  # the prompt scored, and one of those trained on
                    "other_phrases": datasets.List(
                        datasets.Value("string")
                    ),  # more wordings, drawn in training
                    "polygons": datasets.List(datasets.List(datasets.List(_POINT))),
                    "instance_boxes": datasets.List(datasets.List(datasets.Value("float64"), length=4)),
                    "mask": datasets.Value("binary"),  # a 1-bit PNG at the image's size
                    "class_id": class_id,
                }
            ),
        }
    )


ROW_FEATURES = row_features()


@dataclass(frozen=True)
class ReferringColumns:
    """Where a referring data set keeps its images, masks and prompts (`--image_column`, ...)."""

    image: str = "image"
    mask: str = "mask"
    prompt: str = "prompt"

    def mask_flag(self) -> str:
        return f"--mask_column {self.mask}"

    def flags(self) -> dict[str, str]:
        return {"--image_column": self.image, "--mask_column": self.mask, "--prompt_column": self.prompt}


@dataclass(frozen=True)
class SourceOptions:
    """How a user's own data is read and turned into prompts (the flags of `add_source_arguments`)."""

    columns: ReferringColumns = ReferringColumns()
    label_column: str = "label"
    id2label: str | None = None
    class_prompt_template: str = "{}"
    reduce_labels: bool = False
    coco_per_instance: bool = False
    coco_crowd: str = "ignore"


def add_source_arguments(add: Any) -> None:
    """The flags that say where a user's own data keeps what (run_train.py and run_eval.py alike)."""
    add("--dataset_config_name", help="the configuration of --dataset_name, if it has several")
    add("--image_column", default="image", help="your own data: the image column")
    add(
        "--mask_column",
        default="mask",
        help="referring data: a binary mask image, or a list of them, per row",
    )
    add("--prompt_column", default="prompt", help="referring data: per mask a prompt, or a list of prompts")
    add("--label_column", default="label", help="semantic data: the label map (an image of class ids)")
    add(
        "--id2label",
        help="semantic data: class names, a JSON file of id to name (default: the data set's id2label.json)",
    )
    add(
        "--class_prompt_template",
        default="{}",
        help="semantic and COCO data: the prompt of a class, {} standing for its name (e.g. 'a photo of {}')",
    )
    add(
        "--reduce_labels",
        action="store_true",
        help="semantic data: label 0 is 'no class' (ignored) and the others shift down by one, as in transformers",
    )
    add(
        "--coco_per_instance",
        action="store_true",
        help="COCO data: one prompt per instance (default: one per category and image, its instances merged)",
    )
    add(
        "--coco_crowd",
        choices=("ignore", "keep"),
        default="ignore",
        help="COCO data: crowd regions left out of the loss and the scores, or kept as their category's pixels",
    )


def columns_from(args: Any) -> SourceOptions:
    """The `SourceOptions` that a script's flags give."""
    return SourceOptions(
        columns=ReferringColumns(args.image_column, args.mask_column, args.prompt_column),
        label_column=args.label_column,
        id2label=args.id2label,
        class_prompt_template=args.class_prompt_template,
        reduce_labels=args.reduce_labels,
        coco_per_instance=args.coco_per_instance,
        coco_crowd=args.coco_crowd,
    )


def check_class_prompt_template(template: str) -> str:
    """A class prompt template (`--class_prompt_template`) holds `{}` once, where the class name goes."""
    try:
        usable = template.count("{}") == 1 and bool(template.format("x"))
    except (IndexError, KeyError, ValueError):
        usable = False
    if not usable:
        raise CommandError(
            f"--class_prompt_template {template!r} must hold exactly one {{}}, where the class name goes (e.g. 'a "
            "photo of a {}'), and no other braces"
        )
    return template


class BadRow(CommandError):
    """A source row that cannot be converted, named; skippable with --skip_bad_samples."""


def _undecoded(feature: Any, flag: str, where: str) -> Any:
    """The mask column's type with its images left encoded (an Image, or a list of them), or None when it holds
    COCO-style segmentations (polygons or RLE, or lists of them), read as they are."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.List | datasets.Sequence | list) and isinstance(inner, datasets.Image):
        return datasets.List(datasets.Image(decode=False))
    while isinstance(
        getattr(feature, "feature", None), datasets.Value | datasets.List | datasets.Sequence | dict
    ):
        feature = feature.feature  # lists of polygons or of RLE: what they hold
    if isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and not feature.dtype.startswith(("int", "uint", "float"))
    ):
        raise CommandError(
            f"{where}: the {flag} column holds {feature}, not masks: give binary mask images, polygons or COCO RLE "
            "(or lists of them)"
        )
    return None


def is_phrasecut(split: datasets.Dataset) -> bool:
    """PhraseCut's rows (raw folder or export) carry each phrase's structure; a user's converted rows do not."""
    tasks = split.features["tasks"]
    return "phrase_structure" in getattr(tasks, "feature", tasks[0] if isinstance(tasks, list) else {})


def is_project_form(split: datasets.Dataset) -> bool:
    return {"image", "width", "height", "tasks"} <= set(split.column_names)


def check_columns(split: datasets.Dataset, columns: ReferringColumns, where: str) -> None:
    """Every column the conversion reads is there: one sentence naming the missing one and its flag."""
    for flag, name in columns.flags().items():
        if name not in split.column_names:
            raise CommandError(
                f"{where} has no column {name!r} (it has {split.column_names}): name the right one with {flag}"
            )


def referring_to_rows(
    split: datasets.Dataset,
    columns: ReferringColumns,
    where: str,
    skip_bad: bool = False,
    num_proc: int | None = None,
    local_root: str | tuple[str, ...] | None = None,
) -> tuple[datasets.Dataset, int]:
    """`split` converted to the project's rows; returns them and the number of source rows skipped (with
    `skip_bad`; without it the first bad row ends the conversion with a sentence naming it). Cells that name
    a file instead of holding bytes (an imagefolder) are read only inside `local_root`, the data set's folder."""
    check_columns(split, columns, where)
    source = split.cast_column(columns.image, datasets.Image(decode=False))
    mask_type = _undecoded(source.features[columns.mask], columns.mask_flag(), where)
    if mask_type is not None:
        source = source.cast_column(columns.mask, mask_type)
    converted = convert_split(
        source, convert_row, (columns.image, columns.mask, columns.prompt), where, skip_bad, ROW_FEATURES,
        num_proc, local_root=local_root,
    )  # fmt: skip
    skipped = len(split) - len(converted)
    return converted, skipped


@contextmanager
def no_leftovers(source: datasets.Dataset) -> Iterator[None]:
    """A conversion that fails leaves no cache file behind: `datasets` writes each process's share of a map
    as its own file, and the shares that did finish would stay beside the source's cache."""
    folders = {Path(entry["filename"]).parent for entry in source.cache_files}
    before = {path for folder in folders for path in folder.glob("cache-*.arrow")}
    try:
        yield
    except BaseException:
        for path in {path for folder in folders for path in folder.glob("cache-*.arrow")} - before:
            path.unlink(missing_ok=True)
        raise


def convert_split(
    source: datasets.Dataset,
    convert: Callable[..., dict],
    cells: tuple[str, ...],
    where: str,
    skip_bad: bool,
    features: datasets.Features,
    num_proc: int | None,
    **options: Any,
) -> datasets.Dataset:
    """`source` as the project's rows, `convert(*cells of a row, index, **options)` making each, with
    `datasets.map` over `num_proc` processes (cached; a failure leaves nothing in the cache). A `BadRow` ends the
    conversion with a sentence naming the row, or with `skip_bad` leaves the row out."""
    with no_leftovers(source):
        return source.map(
            _convert_rows,
            batched=True,
            with_indices=True,
            remove_columns=source.column_names,
            features=features,
            fn_kwargs={
                "convert": convert,
                "cells": cells,
                "where": where,
                "skip_bad": skip_bad,
                "options": options,
            },
            num_proc=num_proc,
            desc=f"converting {where} to one row per image",
        )


def _convert_rows(
    batch: dict,
    indices: list[int],
    convert: Callable,
    cells: tuple,
    where: str,
    skip_bad: bool,
    options: dict,
) -> dict:
    rows = []
    for i, index in enumerate(indices):
        try:
            rows.append(convert(*(batch[cell][i] for cell in cells), index, **options))
        except BadRow as error:
            if not skip_bad:
                raise CommandError(
                    f"{where}, row {index}: {error}; pass --skip_bad_samples to skip such rows"
                ) from None
    return {key: [row[key] for row in rows] for key in ROW_FEATURES}


def convert_row(
    image_cell: Any,
    mask_cells: Any,
    prompts: Any,
    index: int,
    local_root: str | tuple[str, ...] | None = None,
) -> dict:
    """One source row: its image (bytes kept as they are), and one task per mask with its prompts (the first
    as `phrase`, the others as `other_phrases`)."""
    data, (width, height) = _image_bytes(_encoded(image_cell, "image", local_root))
    several = isinstance(mask_cells, list) and not is_segmentation(mask_cells)
    masks = mask_cells if several else [mask_cells]
    per_mask = prompts if several else [prompts]
    if not isinstance(per_mask, list) or len(per_mask) != len(masks):
        raise BadRow(
            f"{len(masks)} mask(s) but prompts {prompts!r}: give one prompt, or a list of them, per mask"
        )
    tasks = []
    for m, (mask_cell, mask_prompts) in enumerate(zip(masks, per_mask, strict=True)):
        mask = _stored_mask(mask_cell, width, height, m, local_root)
        wordings = mask_prompts if isinstance(mask_prompts, list) else [mask_prompts]
        for prompt in wordings:
            if not isinstance(prompt, str) or not prompt.strip():
                raise BadRow(f"mask {m} has an empty or non-text prompt {prompt!r}")
        if not wordings:
            raise BadRow(f"mask {m} has no prompt")
        tasks.append(
            {
                "task_id": f"{index}_{m}",
                "phrase": wordings[0].strip(),
                "other_phrases": [prompt.strip() for prompt in wordings[1:]],
                "polygons": [],
                "instance_boxes": [],
                "mask": mask,
                "class_id": -1,
            }
        )
    return {
        "image": {"bytes": data, "path": None},
        "image_id": index,
        "width": width,
        "height": height,
        "ignore": b"",
        "tasks": tasks,
    }


def is_segmentation(cell: Any) -> bool:
    """A COCO-style segmentation: RLE (counts and size) or polygons (lists of x, y numbers)."""
    if isinstance(cell, dict):
        return {"counts", "size"} <= set(cell)
    return (
        isinstance(cell, list)
        and bool(cell)
        and all(isinstance(p, list) and all(isinstance(v, int | float) for v in p) for p in cell)
    )


def _stored_mask(
    cell: Any, width: int, height: int, m: int, local_root: str | tuple[str, ...] | None
) -> bytes:
    """A mask cell (an image, or polygons or RLE) as the 1-bit PNG a task stores, checked."""
    if not is_segmentation(cell):
        return _mask_png(_encoded(cell, f"mask {m}", local_root), width, height, m)
    from .coco_data import decode_segmentation  # it builds on this module

    try:
        mask = decode_segmentation(cell, height, width)
    except ValueError as error:
        raise BadRow(f"mask {m}: {error}") from None
    if not mask.any():
        raise BadRow(f"mask {m} is empty (no pixel of the region)")
    encoded = io.BytesIO()
    Image.fromarray(mask).save(encoded, format="PNG")
    return encoded.getvalue()


def _encoded(cell: Any, what: str, local_root: str | tuple[str, ...] | None) -> bytes:
    """The encoded bytes of an `Image(decode=False)` cell. A cell that names a file is read only when the file
    lies in the data set's own local folder (`local_root`; for a Hub data set stored as image files, the caches
    `datasets` downloads them into): data must not make the trainer read its machine's other files."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"]
    path = Path(cell["path"]).resolve() if isinstance(cell, dict) and cell.get("path") else None
    if path is None:
        raise BadRow(f"the {what} cell holds no image")
    roots = (local_root,) if isinstance(local_root, str) else local_root or ()
    if not any(path.is_relative_to(Path(root).resolve()) for root in roots):
        raise BadRow(
            f"the {what} cell names the file {path} instead of holding its bytes, outside the data set's folder"
        )
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadRow(f"the {what} file {path} cannot be read ({error})") from error


EXIF_ORIENTATION = 0x0112  # the tag a camera sets when the picture is stored turned


def _image_bytes(data: bytes) -> tuple[bytes, tuple[int, int]]:
    """The image's bytes and (width, height) as people see it: a photo stored turned (EXIF orientation, as
    phones store them) is stored again upright, since masks, label maps and annotations are drawn on the upright
    picture (as `datasets` and `predict()` show it) and training decodes the bytes as they are."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return _upright(image)
            size = image.size  # before the draft, which decodes at 1/8 scale (still reading every byte)
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()  # every byte read: a truncated file is found here, not in training
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadRow(f"the image does not decode ({error})") from error
    return data, size


def _upright(image: Image.Image) -> tuple[bytes, tuple[int, int]]:
    """A turned photo decoded, turned upright and encoded again (JPEG at quality 95, other formats as PNG)."""
    jpeg = image.format == "JPEG"
    upright = ImageOps.exif_transpose(image)
    if upright.mode not in ("RGB", "L"):
        upright = upright.convert("RGB")
    encoded = io.BytesIO()
    upright.save(encoded, format="JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {}))
    return encoded.getvalue(), upright.size


def _mask_png(data: bytes, width: int, height: int, m: int) -> bytes:
    """A mask as a 1-bit PNG, checked: the image's size, two values (0 and one other), not empty."""
    try:
        with Image.open(io.BytesIO(data)) as mask:
            values = np.asarray(mask.convert("L"))
    except (OSError, ValueError, SyntaxError) as error:
        raise BadRow(f"mask {m} does not decode ({error})") from error
    if values.shape != (height, width):
        raise BadRow(
            f"mask {m} is {values.shape[1]}x{values.shape[0]}, its image {width}x{height}: they must match"
        )
    levels = np.unique(values)
    if len(levels) > 2 or levels[0] != 0:
        shown = ", ".join(str(v) for v in levels[:5])
        raise BadRow(
            f"mask {m} is not binary (values {shown}{', ...' if len(levels) > 5 else ''}): 0 and one other"
        )
    if len(levels) == 1:
        raise BadRow(f"mask {m} is empty (no pixel of the region)")
    encoded = io.BytesIO()
    Image.fromarray(values > 0).save(encoded, format="PNG")
    return encoded.getvalue()


def has_ignore_regions(split: datasets.Dataset) -> bool:
    """Whether any image of `split` has pixels left out of the loss and the metrics (its `ignore` mask)."""
    if "ignore" not in split.column_names:
        return False
    return bool(pc.any(pc.greater(pc.binary_length(split.data.column("ignore")), 0)).as_py())


def ignore_mask(row: Mapping, height: int, width: int) -> np.ndarray:
    """A row's ignore region as bool [height, width] (all False when it has none)."""
    data = row.get("ignore")
    return np.array(mask_from_png(data, height, width)) if data else np.zeros((height, width), dtype=bool)


def mask_from_png(data: bytes, height: int, width: int) -> np.ndarray:
    """A task's stored mask as bool [height, width] (nearest-neighbour if the image was stored smaller)."""
    with Image.open(io.BytesIO(data)) as mask:
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.NEAREST)
        return np.asarray(mask.convert("1"), dtype=bool)


def held_out(
    split: datasets.Dataset, percentage: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded share of `split` as validation (`--validation_split_percentage`), the rest for training."""
    if not 0 < percentage < 100:
        raise CommandError(f"--validation_split_percentage must be in (0, 100), got {percentage:g}")
    parts = split.train_test_split(test_size=percentage / 100, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
