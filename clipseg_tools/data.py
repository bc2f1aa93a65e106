"""The splits a script needs, in the project's one-row-per-image form, from a raw PhraseCut folder or from a
prepared export; and the training images stored once at the model's size."""

from __future__ import annotations

import io
from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from PIL import Image
from transformers.utils import logging

from phrasecut_dataset.builder import SPLIT_ALIASES

from .errors import CommandError
from .own_data import SourceOptions, held_out, is_project_form, referring_to_rows
from .semantic_data import is_semantic, load_id2label, semantic_to_rows
from .sources import load_error
from .transforms import decode_image

REQUIRED_COLUMNS = ("image", "image_id", "width", "height", "tasks")
logger = logging.get_logger(__name__)


def canonical_split(name: str) -> str:
    """`val` is PhraseCut's own name for the split the builder calls `validation`."""
    return SPLIT_ALIASES.get(name, name)


def load_splits(
    wanted: Mapping[str, str],
    data_dir: str | None = None,
    dataset_name: str | None = None,
    cache_dir: str | None = None,
    skip_bad: bool = False,
    accelerator: Any = None,
    dataset_config_name: str | None = None,
    source_options: SourceOptions | None = None,
    hold_out: tuple[str, float, int] | None = None,
    num_proc: int | None = None,
    notes: dict[str, str] | None = None,
    stream_rows: int | None = None,
) -> list[datasets.Dataset]:
    """The splits named by `wanted` (flag -> split name, e.g. {"--split": "test"}), in its order, images left as
    bytes (a transform decodes each image once for all its phrases).

    `data_dir` is a raw PhraseCut folder, prepared once by the project's builder (the first process
    prepares, the others read the cache); `dataset_name` is a Hub id or a local folder (Parquet, imagefolder,
    COCO): the project's export, or the user's own data (referring rows, semantic label maps or COCO instances,
    read as `source_options` say), converted once and cached. With
    `hold_out` (flag, percentage, seed), that flag's split, when the data has none, is a seeded share of the
    first split's rows, and `notes[flag]` says so. With `stream_rows` (`dataset_name` only), the splits are
    streamed, not downloaded whole, and the first `stream_rows` rows of each (all of them with 0) converted: the
    validation split of a data set too large to download (`run_train.py --streaming`). A split that is missing,
    or rows of another form, end with one sentence naming the flags (`CommandError`).
    """
    names = {flag: canonical_split(name) for flag, name in wanted.items()}
    source = f"--data_dir {data_dir}" if data_dir else f"--dataset_name {dataset_name}"
    options = source_options or SourceOptions()
    from .coco_data import coco_splits, is_coco_folder

    coco = bool(dataset_name) and is_coco_folder(dataset_name)

    def load() -> Any:
        if coco:  # each split is read from its annotation file when it is converted ("val" is "validation")
            return {canonical_split(name): name for name in coco_splits(dataset_name)}
        if data_dir:
            from phrasecut_dataset import load_phrasecut

            return load_phrasecut(
                data_dir, cache_dir=cache_dir, splits=sorted(set(names.values())), skip_bad=skip_bad
            )
        return load_source(dataset_name, dataset_config_name, cache_dir, streaming=stream_rows is not None)

    def prepared() -> tuple[dict[str, datasets.Dataset], list[str]]:
        splits = load()
        found = {}
        for flag, name in names.items():
            if name not in splits:
                continue
            where = f"the {name} split of {source}"
            if coco:
                found[flag] = coco_in_project_form(
                    dataset_name, splits[name], options, skip_bad, num_proc, cache_dir
                )
                continue
            local_root = data_folders(dataset_name, cache_dir)
            split = splits[name] if stream_rows is None else first_rows(splits[name], stream_rows)
            found[flag] = in_project_form(
                split, where, options, skip_bad, num_proc, local_root, dataset_name, cache_dir
            )
        return found, sorted(splits)

    if accelerator is not None:
        with accelerator.main_process_first():
            found, available = prepared()
    else:
        found, available = prepared()

    if hold_out and hold_out[0] not in found:
        first = next(iter(names))
        if first in found:
            flag, percentage, seed = hold_out
            found[first], found[flag] = held_out(found[first], percentage, seed)
            said = f"{percentage:g}% of {names[first]!r} held out ({len(found[flag]):,} images, seed {seed})"
            logger.info(f"{source} has no {names[flag]!r} split: {said} (--validation_split_percentage)")
            if notes is not None:
                notes[flag] = said
    loaded = []
    for flag, name in names.items():
        if flag not in found:
            raise CommandError(
                f"{flag} {wanted[flag]!r}: {source} has no prepared split {name!r} (it has {available}); prepare "
                "it, or pick one of those"
            )
        split = found[flag].cast_column("image", datasets.Image(decode=False))
        check_embedded_images(split, name, source)
        loaded.append(split)
    return loaded


def load_source(
    dataset_name: str, config_name: str | None, cache_dir: str | None, streaming: bool = False
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """`--dataset_name`'s splits as `datasets` reads them, downloaded and prepared, or as streams (nothing
    downloaded ahead); a source that cannot be read ends with one sentence naming it."""
    try:
        return datasets.load_dataset(dataset_name, config_name, cache_dir=cache_dir, streaming=streaming)
    except (OSError, ValueError) as error:
        what = f"--dataset_name {dataset_name} (a Hub id or a local folder of Parquet files or images)"
        raise load_error(f"{what} could not be loaded", dataset_name, error, "dataset") from error


def first_rows(stream: datasets.IterableDataset, count: int) -> datasets.Dataset:
    """The first `count` rows of a streamed split (every row with 0), in memory, images kept as stored (not
    decoded and encoded again)."""
    stream = stream.decode(False)
    return datasets.Dataset.from_list(list(islice(stream, count or None)), features=stream.features)


def data_folders(dataset_name: str | None, cache_dir: str | None) -> str | tuple[str, ...] | None:
    """Where a data set's rows may name image files: a local data set's own folder; for a Hub data set stored
    as image files (an imagefolder: `datasets` keeps their paths, not their bytes), the caches it downloads to."""
    if not dataset_name:
        return None
    if Path(dataset_name).is_dir():
        return dataset_name
    from huggingface_hub import constants

    return (cache_dir or datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE)


def in_project_form(
    split: datasets.Dataset,
    where: str,
    options: SourceOptions | None,
    skip_bad: bool,
    num_proc: int | None,
    local_root: str | tuple[str, ...] | None = None,
    dataset_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """The split as the project's rows: as it is when it has them, else converted from semantic label maps (a
    label column of images and no mask column) or referring rows."""
    options = options or SourceOptions()
    if is_project_form(split):
        missing = [column for column in REQUIRED_COLUMNS if column not in split.column_names]
        if missing:
            raise CommandError(
                f"{where} lacks the columns {missing}: it is not in the project's form (one row per image with its "
                "tasks)"
            )
        return split
    if is_semantic(split, options.label_column) and options.columns.mask not in split.column_names:
        converted, skipped = semantic_to_rows(
            split,
            options.columns.image,
            options.label_column,
            load_id2label(options.id2label, dataset_name, cache_dir),
            where,
            options.class_prompt_template,
            options.reduce_labels,
            skip_bad,
            num_proc,
            local_root,
        )
    else:
        check_shape(split, options, where)
        converted, skipped = referring_to_rows(split, options.columns, where, skip_bad, num_proc, local_root)
    log_converted(converted, where, skipped)
    return converted


def check_shape(split: datasets.Dataset, options: SourceOptions, where: str) -> None:
    """Rows that are neither referring rows (a mask column) nor semantic ones (a label column of images) are
    named with both ways to read them."""
    mask, label = options.columns.mask, options.label_column
    if mask in split.column_names:
        return
    held = split.features.get(label)
    label_said = f"its {label!r} column holds {held}, not label-map images" if held is not None else ""
    raise CommandError(
        f"{where} has neither a mask column {mask!r} (referring rows: name it with --mask_column) nor a column of "
        f"label-map images (semantic data: --label_column){'; ' + label_said if label_said else ''}; it has "
        f"{split.column_names}"
    )


def coco_in_project_form(
    folder: str,
    split: str,
    options: SourceOptions,
    skip_bad: bool,
    num_proc: int | None,
    cache_dir: str | None,
) -> datasets.Dataset:
    """A COCO split (annotations/instances_<split>.json and its image folder) as the project's rows."""
    from .coco_data import coco_to_rows

    converted, skipped = coco_to_rows(
        folder,
        split,
        per_instance=options.coco_per_instance,
        crowd=options.coco_crowd,
        class_prompt_template=options.class_prompt_template,
        skip_bad=skip_bad,
        num_proc=num_proc,
        cache_dir=cache_dir,
    )
    log_converted(converted, f"the {split} split of --dataset_name {folder}", skipped)
    return converted


def log_converted(converted: datasets.Dataset, where: str, skipped: int) -> None:
    tasks = pc.sum(pc.list_value_length(converted.data.column("tasks"))).as_py() or 0
    logger.info(
        f"{where}: {len(converted):,} images with {tasks:,} prompts"
        + (f", {skipped:,} bad rows skipped (--skip_bad_samples)" if skipped else "")
    )


def check_embedded_images(split: datasets.Dataset, name: str, source: str) -> None:
    """Refuse a split with an image cell that holds no bytes: decoding would open the cell's `path` instead, a
    file of this machine named by the data (any file, a secret one too). The builder and the export always
    embed the bytes, so such a row was made elsewhere."""
    cells = split.data.column("image")
    missing = pc.is_null(pc.struct_field(cells, "bytes"))
    if not pc.any(missing).as_py():
        return
    row = pc.index(missing, True).as_py()
    path = cells[row]["path"].as_py()
    held = f"only the file path {path!r}" if path else "nothing"
    raise CommandError(
        f"row {row} of the {name} split of {source} holds no image bytes but {held}: images are read only from "
        "the bytes stored in the data set, never from files it names; export it again with `python -m "
        "phrasecut_dataset.publish`, which embeds them"
    )


def shrink_images(dataset: Any, short_side: int, quality: int = 95, num_proc: int | None = None) -> Any:
    """The dataset with images larger than `short_side` (on their short side) shrunk to it, polygons and boxes
    scaled with them, cached by `datasets` next to the source's cache files (`--shrink_train_images`).

    Training decodes a JPEG and resizes it for every phrase it draws; at GPU speed that CPU work is the
    bottleneck. Shrunk once, each sample is a smaller decode and no resize: the square crop of side min(height,
    width) is then already model-sized. The geometry is that of cropping the full image and resizing the crop;
    pixel values differ by one JPEG re-encoding (`quality`) and the order of the two resamplings, and masks
    drawn from the scaled polygons can differ by a pixel at their edges. For training only: evaluation keeps
    the native images and masks of the official protocol.
    """
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
