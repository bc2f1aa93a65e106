"""COCO instance annotations as the project's rows (see `own_data.row_features`), so that a COCO-style folder
trains and scores like PhraseCut: one row per image, one prompt per category in it (or per instance).

The folder is COCO's own layout: `annotations/instances_<split>.json`, and the images in `<split>/` (or
`images/<split>/`), each named by its `file_name` relative to that folder. Segmentations may be polygons,
uncompressed RLE or compressed RLE (COCO's string encoding, decoded here: pycocotools is not needed). Crowd
regions (`iscrowd`) either become the row's `ignore` pixels or count as ordinary instances.

The conversion runs once with `datasets.map` over several processes; its result is cached under a key made of
the annotation file's bytes, the images' sizes and times, the options and this code, so a second run on the
same inputs reads the cache instead of converting again.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image
from transformers.utils import logging

from phrasecut_dataset.masks import polygons_to_mask

from .cli import plural
from .errors import CommandError
from .own_data import BadRow, _image_bytes, check_class_prompt_template, row_features

logger = logging.get_logger(__name__)

CROWD_CHOICES = ("ignore", "keep")
ANNOTATION_PREFIX = "instances_"
# The modules whose code decides what ends up in a row: editing one of them must convert the data again.
_ROW_MODULES = (
    Path(__file__),
    Path(__file__).with_name("own_data.py"),
    Path(inspect.getfile(polygons_to_mask)),
)
_RECORD_FEATURES = datasets.Features(
    {
        "image_id": datasets.Value("int64"),
        "image": datasets.Value("string"),  # the JSON image entry; "" when annotations name an unlisted id
        "annotations": datasets.Value("string"),  # the image's annotations, a JSON list
    }
)


def is_coco_folder(path: str | Path) -> bool:
    """A local folder with COCO instance annotations (`annotations/instances_*.json`)."""
    return bool(coco_splits(path))


def coco_splits(path: str | Path) -> list[str]:
    """The split names a COCO folder has annotations for (`instances_<split>.json`), sorted."""
    folder = Path(path) / "annotations"
    if not folder.is_dir():
        return []
    files = folder.glob(f"{ANNOTATION_PREFIX}*.json")
    return sorted(f.name[len(ANNOTATION_PREFIX) : -len(".json")] for f in files if f.is_file())


def check_options(crowd: str, class_prompt_template: str) -> None:
    """Refuse a crowd policy or a prompt template that cannot work, before anything is read."""
    if crowd not in CROWD_CHOICES:
        raise CommandError(f"--coco_crowd {crowd!r}: choose one of {', '.join(CROWD_CHOICES)}")
    check_class_prompt_template(class_prompt_template)


@dataclass(frozen=True)
class CocoSplit:
    """One split's annotation file, read and checked as a whole: what the per-image conversion starts from."""

    annotation_file: Path
    image_folder: Path
    class_names: list[str]  # the categories' names, sorted by COCO category id
    class_index: dict[int, int]  # COCO category id -> class_id (the index into class_names)
    records: dict[str, list]  # per image with usable annotations: image_id, image entry, annotations (JSON)
    unannotated: int  # images left out for having no usable annotation (not errors)
    digest: str  # of the annotation file's bytes


def read_coco_split(folder: str | Path, split: str, crowd: str = "ignore") -> CocoSplit:
    """The split's annotation file read, its categories checked, its annotations grouped by image. Problems
    with the file as a whole raise `CommandError`; those of one image are left to the conversion (`BadRow`)."""
    folder = Path(folder)
    annotation_file = _annotation_file(folder, split)
    raw = annotation_file.read_bytes()
    data = _parse(raw, annotation_file)
    class_names, class_index = _categories(data["categories"], annotation_file)
    records, unannotated = _records(data, annotation_file, crowd)
    return CocoSplit(
        annotation_file=annotation_file,
        image_folder=_image_folder(folder, split),
        class_names=class_names,
        class_index=class_index,
        records=records,
        unannotated=unannotated,
        digest=hashlib.sha256(raw).hexdigest(),
    )


def _annotation_file(folder: Path, split: str) -> Path:
    path = folder / "annotations" / f"{ANNOTATION_PREFIX}{split}.json"
    if path.is_file():
        return path
    found = coco_splits(folder)
    has = f"it has the splits {found}" if found else f"it has no annotations/{ANNOTATION_PREFIX}*.json"
    raise CommandError(
        f"{folder} has no annotations/{path.name} ({has}): pick one of its splits, or point at the COCO folder"
    )


def _image_folder(folder: Path, split: str) -> Path:
    candidates = [folder / split, folder / "images" / split]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise CommandError(
        f"{folder} has no image folder for the split {split!r}: put its images in {candidates[0]} or "
        f"{candidates[1]}"
    )


def _parse(raw: bytes, path: Path) -> dict:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise CommandError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}): fix or replace it"
        ) from None
    except UnicodeDecodeError as error:
        raise CommandError(f"{path} is not UTF-8 text ({error}): fix or replace it") from None
    lists = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in lists):
        raise CommandError(
            f"{path} is not a COCO annotation file: it needs the lists 'images', 'annotations' and 'categories'"
        )
    return data


def _categories(categories: list, path: Path) -> tuple[list[str], dict[int, int]]:
    """Names sorted by COCO id, and each id's index: COCO's ids have gaps (1..90 for 80 classes)."""
    by_id = {}
    for category in categories:
        ok = isinstance(category, dict) and _is_int(category.get("id"))
        name = category.get("name") if ok else None
        if not ok or not isinstance(name, str) or not name.strip():
            raise CommandError(f"{path}: the category {category!r} needs an integer id and a name: fix it")
        if category["id"] in by_id:
            raise CommandError(f"{path}: two categories have the id {category['id']}: give each its own")
        by_id[category["id"]] = name.strip()
    names = [by_id[key] for key in sorted(by_id)]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise CommandError(f"{path}: several categories are named {twice}: give each its own name")
    if not names:
        raise CommandError(f"{path} lists no categories: a COCO file names the classes its annotations use")
    return names, {key: index for index, key in enumerate(sorted(by_id))}


def _records(data: dict, path: Path, crowd: str) -> tuple[dict[str, list], int]:
    """One record per image with a usable annotation (a crowd one only with crowd="keep"), in the file's
    order, then one per image id that annotations name but the images do not list (the conversion names it)."""
    by_image: dict[int, list] = {}
    for k, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or not _is_int(annotation.get("image_id")):
            raise CommandError(
                f"{path}: annotation #{k} ({annotation!r:.80}) has no integer image_id: fix it"
            )
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    records: dict[str, list] = {"image_id": [], "image": [], "annotations": []}
    listed, unannotated = set(), 0
    for image in data["images"]:
        if not isinstance(image, dict) or not _is_int(image.get("id")) or image["id"] in listed:
            raise CommandError(
                f"{path}: the image entry {image!r:.80} needs an integer id of its own: fix it"
            )
        listed.add(image["id"])
        annotations = by_image.get(image["id"], [])
        if not any(crowd == "keep" or not a.get("iscrowd") for a in annotations):
            unannotated += 1
            continue
        _add(records, image["id"], json.dumps(image), annotations)
    for image_id, annotations in by_image.items():
        if image_id not in listed:
            _add(records, image_id, "", annotations)
    return records, unannotated


def _add(records: dict[str, list], image_id: int, image: str, annotations: list) -> None:
    records["image_id"].append(image_id)
    records["image"].append(image)
    records["annotations"].append(json.dumps(annotations))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ConversionOptions:
    """What the per-image conversion needs besides the image's record (passed to each process)."""

    image_folder: str
    class_names: tuple[str, ...]
    class_index: dict[int, int]
    per_instance: bool
    crowd: str
    template: str
    where: str
    skip_bad: bool


def coco_to_rows(
    folder: str | Path,
    split: str,
    *,
    per_instance: bool = False,
    crowd: str = "ignore",
    class_prompt_template: str = "{}",
    skip_bad: bool = False,
    num_proc: int | None = None,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, int]:
    """A COCO folder's split as the project's rows (features `row_features(class_names)`), and the number of
    images skipped as bad (with `skip_bad`; without it the first bad image ends the conversion with a sentence
    naming it). One task per (image, category), its instances merged, or with `per_instance` one per
    annotation; `class_id` indexes the category names sorted by COCO id. Images without a usable annotation
    are left out and logged, not counted as bad."""
    check_options(crowd, class_prompt_template)
    coco = read_coco_split(folder, split, crowd)
    if coco.unannotated:
        unannotated = plural(coco.unannotated, "image")
        logger.info(f"{coco.annotation_file}: {unannotated} without usable annotations left out")
    options = ConversionOptions(
        image_folder=str(coco.image_folder.resolve()),
        class_names=tuple(coco.class_names),
        class_index=coco.class_index,
        per_instance=per_instance,
        crowd=crowd,
        template=class_prompt_template,
        where=str(coco.annotation_file),
        skip_bad=skip_bad,
    )
    features = row_features(coco.class_names)
    if not coco.records["image_id"]:  # map would return an empty set without the rows' columns
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features), 0
    records = datasets.Dataset.from_dict(coco.records, features=_RECORD_FEATURES)
    rows = records.map(
        _convert_batch,
        batched=True,
        remove_columns=records.column_names,
        features=features,
        fn_kwargs={"options": options},
        num_proc=num_proc,
        desc=f"converting COCO {split} to one row per image",
        **_cache_arguments(coco, options, split, cache_dir),
    )
    return rows, len(records) - len(rows)


def _cache_arguments(coco: CocoSplit, options: ConversionOptions, split: str, cache_dir: str | None) -> dict:
    """An in-memory source has no cache folder of its own: the map's file is named here, keyed by content, so
    that a second conversion of the same input reads it (datasets only keeps a map's file once it is whole)."""
    key = _cache_key(coco, options)
    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "coco_rows"
    folder.mkdir(parents=True, exist_ok=True)
    return {"cache_file_name": str(folder / f"{split}-{key}.arrow"), "new_fingerprint": key}


def _cache_key(coco: CocoSplit, options: ConversionOptions) -> str:
    """What the rows depend on: the code, the annotations, the options, and each image file's size and time
    (an image replaced under the same name must be read again)."""
    digest = hashlib.sha256()
    for module in _ROW_MODULES:
        digest.update(module.read_bytes())
    digest.update(coco.digest.encode())
    fields = (options.image_folder, options.per_instance, options.crowd, options.template, options.skip_bad)
    digest.update(repr(fields).encode())
    for entry in coco.records["image"]:
        digest.update(repr(_file_state(options.image_folder, entry)).encode())
    return digest.hexdigest()[:32]


def _file_state(image_folder: str, entry: str) -> tuple[int, int] | None:
    name = json.loads(entry).get("file_name") if entry else None
    try:
        state = os.stat(Path(image_folder, name)) if isinstance(name, str) else None
    except OSError:
        return None
    return (state.st_size, state.st_mtime_ns) if state else None


def _convert_batch(batch: dict, options: ConversionOptions) -> dict:
    rows = []
    for image_id, entry, listed in zip(batch["image_id"], batch["image"], batch["annotations"]):
        image = json.loads(entry) if entry else {}
        try:
            rows.append(convert_image(image_id, image, json.loads(listed), options))
        except BadRow as error:
            if not options.skip_bad:
                shown = image.get("file_name") if entry else "not among the file's images"
                raise CommandError(
                    f"{options.where}, image {image_id} ({shown}): {error}; pass --skip_bad_samples to skip "
                    "such images"
                ) from None
    return {key: [row[key] for row in rows] for key in row_features()}


def convert_image(image_id: int, image: dict, annotations: list[dict], options: ConversionOptions) -> dict:
    """One COCO image as a row: its bytes as they are, its crowd regions as `ignore` (or as instances), a task
    per category (all its instances merged) or per instance. Raises `BadRow` naming what is wrong."""
    if not image:
        ids = [a.get("id") for a in annotations]
        raise BadRow(
            f"annotations {ids} name image_id {image_id}, which the file's images do not list: fix their "
            "image_id or remove them"
        )
    data, (width, height) = _read_image(image, options.image_folder)
    instances, crowds = [], []
    for annotation in annotations:
        class_id = _class_of(annotation, options.class_index)
        mask = _annotation_mask(annotation, height, width)
        kept = not annotation.get("iscrowd") or options.crowd == "keep"
        (instances if kept else crowds).append((annotation, class_id, mask))
    ignore = np.logical_or.reduce([m for _, _, m in crowds]) if crowds else None
    tasks_of = _instance_tasks if options.per_instance else _category_tasks
    return {
        "image": {"bytes": data, "path": None},
        "image_id": image_id,
        "width": width,
        "height": height,
        "ignore": _png(ignore) if ignore is not None and ignore.any() else b"",
        "tasks": tasks_of(image_id, instances, options),
    }


def _read_image(image: dict, image_folder: str) -> tuple[bytes, tuple[int, int]]:
    """The image's bytes, read only from inside the image folder: a `file_name` must not make the converter
    read its machine's other files. Its decoded size must be the one the annotations were drawn at."""
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        raise BadRow("its image entry has no file_name: name the image's file, relative to the image folder")
    path = (Path(image_folder) / name).resolve()
    if not path.is_relative_to(image_folder):
        raise BadRow(
            f"the file_name points outside the image folder {image_folder}: images are read only there"
        )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadRow(f"the image file {path} is missing: put it there or remove the image's entry") from None
    except OSError as error:
        raise BadRow(f"the image file {path} cannot be read ({error})") from None
    try:
        data, (width, height) = _image_bytes(raw)
    except BadRow as error:
        raise BadRow(f"{error}: replace the file or remove the image's entry") from None
    if (image.get("width"), image.get("height")) != (width, height):
        raise BadRow(
            f"the image file is {width}x{height}, the annotation file says {image.get('width')}x"
            f"{image.get('height')}: they must match (fix the entry's width and height, or the image)"
        )
    return data, (width, height)


def _class_of(annotation: dict, class_index: dict[int, int]) -> int:
    category = annotation.get("category_id")
    if not _is_int(category) or category not in class_index:
        raise BadRow(
            f"annotation {annotation.get('id')} has category_id {category!r}, which the file's categories do "
            "not list: fix it or remove the annotation"
        )
    return class_index[category]


def _annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    try:
        return decode_segmentation(annotation.get("segmentation"), height, width)
    except ValueError as error:
        raise BadRow(f"annotation {annotation.get('id')}: {error}; fix or remove it") from None


def _category_tasks(image_id: int, instances: list[tuple], options: ConversionOptions) -> list[dict]:
    """One task per category present: the union of its instances, one box per instance."""
    tasks = []
    for class_id in sorted({c for _, c, _ in instances}):
        members = [(a, m) for a, c, m in instances if c == class_id]
        ids = [a.get("id") for a, _ in members]
        what = f"the mask of {options.class_names[class_id]!r} (annotations {ids})"
        task_id = f"{image_id}_c{members[0][0]['category_id']}"
        tasks.append(_task(task_id, class_id, members, what, options))
    return tasks


def _instance_tasks(image_id: int, instances: list[tuple], options: ConversionOptions) -> list[dict]:
    return [
        _task(f"{image_id}_{a.get('id')}", c, [(a, m)], f"the mask of annotation {a.get('id')}", options)
        for a, c, m in instances
    ]


def _task(task_id: str, class_id: int, members: list[tuple], what: str, options: ConversionOptions) -> dict:
    """A task of `members` (annotation, mask) pairs: their union as the mask, their boxes."""
    mask = np.logical_or.reduce([m for _, m in members])
    if not mask.any():
        raise BadRow(f"{what} is empty (no pixel of it lies in the image): fix or remove the annotations")
    return {
        "task_id": task_id,
        "phrase": options.template.format(options.class_names[class_id]),
        "other_phrases": [],
        "polygons": [],
        "instance_boxes": [_box(a, m) for a, m in members],
        "mask": _png(mask),
        "class_id": class_id,
    }


def _box(annotation: dict, mask: np.ndarray) -> list[float]:
    """COCO's bbox [x, y, w, h]; the mask's own box where the file gives none (it is optional for RLE)."""
    box = annotation.get("bbox")
    if isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box):
        return [float(v) for v in box]
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _png(mask: np.ndarray) -> bytes:
    """A bool mask as a 1-bit PNG, the form `own_data` stores masks in."""
    encoded = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(encoded, format="PNG")
    return encoded.getvalue()


# -- segmentations --------------------------------------------------------------------------------------


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation as bool [height, width]: polygons (a list of flat [x1, y1, x2, y2, ...] lists) or RLE
    ({"counts": [ints] or COCO's string, "size": [height, width]}). Raises ValueError saying what is wrong."""
    if isinstance(segmentation, list) and all(_is_flat_polygon(p) for p in segmentation):
        # PhraseCut's rasteriser (PIL, outline and fill, int() vertices): one convention for every mask.
        points = [[p[i : i + 2] for i in range(0, len(p), 2)] for p in segmentation]
        return polygons_to_mask(points, height, width)
    if isinstance(segmentation, dict) and {"counts", "size"} <= set(segmentation):
        return _rle_mask(segmentation, height, width)
    raise ValueError(
        f"its segmentation {segmentation!r:.60} is neither polygons (lists of x, y numbers) nor RLE "
        "(counts and size)"
    )


def _is_flat_polygon(polygon: Any) -> bool:
    return (
        isinstance(polygon, list)
        and len(polygon) % 2 == 0
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in polygon)
    )


def _rle_mask(rle: dict, height: int, width: int) -> np.ndarray:
    size, counts = rle["size"], rle["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise ValueError(f"its RLE size {size!r} is not [height, width]")
    if size != [height, width]:
        raise ValueError(
            f"its RLE size is {size[0]}x{size[1]} (height x width), the image's {height}x{width}: they must match"
        )
    if isinstance(counts, bytes):  # pycocotools' own encoder gives the string as bytes
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        counts = rle_counts(counts)
    elif not (isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts)):
        raise ValueError("its RLE counts are neither a string nor a list of non-negative integers")
    if sum(counts) != height * width:
        raise ValueError(
            f"its RLE counts cover {sum(counts)} pixels, its size {height}x{width} has {height * width}"
        )
    # Runs alternate 0, 1, 0, ... starting with 0, over the pixels in column-major order.
    values = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return values.reshape(width, height).T


def rle_counts(text: str) -> list[int]:
    """COCO's compressed RLE string as its run lengths. Each character carries 5 bits of a number (ASCII 48
    onwards), 0x20 marks that more follow and 0x10 on the last one is the sign; from the fourth run on a
    number is the difference to the run two before (the same value's previous run)."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                raise ValueError("its RLE string ends in the middle of a number")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"its RLE string holds {text[position]!r}, outside COCO's encoding")
            value |= (code & 0x1F) << shift
            more, position, shift = bool(code & 0x20), position + 1, shift + 5
            if not more and code & 0x10:
                value -= 1 << shift  # sign-extend: the number is negative
        counts.append(value + counts[-2] if len(counts) > 2 else value)
        if counts[-1] < 0:
            raise ValueError(f"its RLE string decodes to a negative run ({counts[-1]})")
    return counts


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """A bool [height, width] mask as COCO RLE: `counts` as COCO's string, or as a list with compressed=False."""
    flat = np.asarray(mask, dtype=bool).T.ravel()  # column-major, as COCO counts
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)  # the first run counts zeros, even when there are none
    size = [int(mask.shape[0]), int(mask.shape[1])]
    return {"size": size, "counts": _rle_string(counts) if compressed else counts}


def _rle_string(counts: list[int]) -> str:
    characters = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            code = value & 0x1F
            value >>= 5
            more = value != -1 if code & 0x10 else value != 0
            characters.append(chr(48 + (code | 0x20 if more else code)))
    return "".join(characters)
