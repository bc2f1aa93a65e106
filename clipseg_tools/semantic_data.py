"""Semantic segmentation data (an image and a label map of class ids per row, the contract of transformers'
`run_semantic_segmentation_no_trainer.py`) in the project's rows: every class present in an image becomes a
prompt (`--class_prompt_template`, `{}` for the class name) with its pixels as the mask; the classes absent from
the image are the negatives training draws; pixels of the ignore index (255; `--reduce_labels` makes 0 one of
them, as transformers does) go into the row's ignore region, out of the loss and the metrics.

The class names come from the data set's `id2label.json` (in its folder or its Hub repository) or `--id2label`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from .errors import CommandError
from .own_data import BadRow, _encoded, _image_bytes, check_class_prompt_template, convert_split, row_features

IGNORE_INDEX = 255


def is_semantic(split: datasets.Dataset, label_column: str) -> bool:
    """A split whose label column holds images (label maps), not one mask list per row."""
    return isinstance(split.features.get(label_column), datasets.Image)


def load_id2label(flag: str | None, dataset_name: str | None, cache_dir: str | None = None) -> dict[int, str]:
    """Class names by id: `--id2label` (a JSON file, or a JSON object as text), else the data set's own
    `id2label.json` (beside a local folder's data, or in its Hub repository)."""
    if flag:
        path = Path(flag)
        text, where = (path.read_text(), f"--id2label {flag}") if path.is_file() else (flag, "--id2label")
        return _parsed_id2label(text, where)
    reason = ""
    if dataset_name and Path(dataset_name).is_dir():
        path = Path(dataset_name) / "id2label.json"
        if path.is_file():
            return _parsed_id2label(path.read_text(), str(path))
    elif dataset_name:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(dataset_name, "id2label.json", repo_type="dataset", cache_dir=cache_dir)
        except Exception as error:  # noqa: BLE001 - absent, offline or refused: the sentence below says which
            reason = f" ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
        else:
            return _parsed_id2label(Path(path).read_text(), f"id2label.json of {dataset_name}")
    raise CommandError(
        f"--dataset_name {dataset_name}: semantic data needs its class names, and no id2label.json was found beside "
        f"it{reason}: give them with --id2label "
        'FILE.json (a JSON object of id to name, e.g. {"0": "wall", "1": "sky"})'
    )


def _parsed_id2label(text: str, where: str) -> dict[int, str]:
    try:
        raw = json.loads(text)
        id2label = {int(key): str(name).strip() for key, name in raw.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
        raise CommandError(
            f'{where} is not a JSON object of class id to name (e.g. {{"0": "wall"}}): {error}'
        ) from None
    bad = [key for key, name in id2label.items() if not 0 <= key < IGNORE_INDEX or not name]
    if bad or not id2label:
        raise CommandError(
            f"{where}: class ids must be 0 to {IGNORE_INDEX - 1} with non-empty names (not {bad or 'none'})"
        )
    seen: dict[str, int] = {}
    for key, name in sorted(id2label.items()):
        if name in seen:
            raise CommandError(
                f"{where}: classes {seen[name]} and {key} are both named {name!r}: each class needs its own name"
            )
        seen[name] = key
    return id2label


def semantic_to_rows(
    split: datasets.Dataset,
    image_column: str,
    label_column: str,
    id2label: dict[int, str],
    where: str,
    template: str = "{}",
    reduce_labels: bool = False,
    skip_bad: bool = False,
    num_proc: int | None = None,
    local_root: str | tuple[str, ...] | None = None,
) -> tuple[datasets.Dataset, int]:
    """`split` converted to the project's rows (see the module's docstring); returns them and the number of
    rows skipped with `skip_bad` (without it the first bad row ends the conversion, named)."""
    for flag, name in (("--image_column", image_column), ("--label_column", label_column)):
        if name not in split.column_names:
            raise CommandError(
                f"{where} has no column {name!r} (it has {split.column_names}): name the right one with {flag}"
            )
    check_class_prompt_template(template)
    ids = sorted(id2label)
    source = split.cast_column(image_column, datasets.Image(decode=False))
    source = source.cast_column(label_column, datasets.Image(decode=False))
    converted = convert_split(
        source,
        convert_row,
        (image_column, label_column),
        where,
        skip_bad,
        row_features([id2label[i] for i in ids]),
        num_proc,
        ids=ids,
        prompts=[template.format(id2label[i]) for i in ids],
        reduce_labels=reduce_labels,
        local_root=local_root,
    )
    return converted, len(split) - len(converted)


def convert_row(
    image_cell: Any,
    label_cell: Any,
    index: int,
    ids: list[int],
    prompts: list[str],
    reduce_labels: bool = False,
    local_root: str | tuple[str, ...] | None = None,
) -> dict:
    """One image and its label map: a task per class present, the ignore pixels as the row's ignore region."""
    data, (width, height) = _image_bytes(_encoded(image_cell, "image", local_root))
    labels = label_values(_encoded(label_cell, "label", local_root), width, height, reduce_labels)
    ignore = labels == IGNORE_INDEX
    lookup = np.full(IGNORE_INDEX + 1, -1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    present = np.unique(labels[~ignore])
    unknown = [int(v) for v in present if lookup[v] < 0]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:5])
        raise BadRow(
            f"the label map holds class id(s) {shown} that id2label does not name (give them names with --id2label)"
        )
    if not len(present):
        raise BadRow("the label map has no labelled pixel (all of it is the ignore index)")
    tasks = [
        {
            "task_id": f"{index}_{int(value)}",
            "phrase": prompts[lookup[value]],
            "other_phrases": [],
            "polygons": [],
            "instance_boxes": [],
            "mask": _png(labels == value),
            "class_id": int(lookup[value]),
        }
        for value in present
    ]
    return {
        "image": {"bytes": data, "path": None},
        "image_id": index,
        "width": width,
        "height": height,
        "ignore": _png(ignore) if ignore.any() else b"",
        "tasks": tasks,
    }


def label_values(data: bytes, width: int, height: int, reduce_labels: bool = False) -> np.ndarray:
    """A label map's class ids as uint8 [height, width], checked; with `reduce_labels`, 0 becomes the ignore
    index and every other id one less (transformers' `do_reduce_labels`)."""
    try:
        with Image.open(io.BytesIO(data)) as label:
            if label.mode not in ("L", "P", "I", "I;16", "1"):
                raise BadRow(
                    f"the label map is a {label.mode} image: it must hold one class id per pixel (a grey or palette PNG)"
                )
            values = np.asarray(label)
    except (OSError, ValueError, SyntaxError) as error:
        raise BadRow(f"the label map does not decode ({error})") from error
    if values.shape != (height, width):
        raise BadRow(
            f"the label map is {values.shape[1]}x{values.shape[0]}, its image {width}x{height}: they must match"
        )
    if values.max(initial=0) > IGNORE_INDEX or values.min(initial=0) < 0:
        raise BadRow(f"the label map holds ids outside 0-{IGNORE_INDEX} (largest {int(values.max())})")
    values = values.astype(np.uint8)
    if reduce_labels:
        values = np.where(
            values == 0, IGNORE_INDEX, np.where(values == IGNORE_INDEX, IGNORE_INDEX, values - 1)
        )
    return values.astype(np.uint8)


def _png(mask: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(mask).save(encoded, format="PNG")
    return encoded.getvalue()
