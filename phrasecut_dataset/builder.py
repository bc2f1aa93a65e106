"""A `datasets` builder over the real PhraseCut (VGPhraseCut_v0) layout: one row per image, all its tasks.

    data_dir/
        refer_train.json  refer_val.json  refer_test.json  refer_miniv.json   (lists of tasks)
        image_data_split.json                                               (image metadata)
        name_att_rel_count.json                                             (optional: frequency ranks)
        images/<image_id>.jpg

Usage:

    from phrasecut_dataset import load_phrasecut
    dataset = load_phrasecut("data/VGPhraseCut_v0")          # DatasetDict: train/validation/test/miniv

or, with the builder itself:

    builder = PhraseCut(data_dir="data/VGPhraseCut_v0", skip_bad=True)
    builder.download_and_prepare()
    dataset = builder.as_dataset()
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.builder import Key
from datasets.exceptions import DatasetGenerationError

from .masks import polygons_to_mask
from .subsets import FrequencyRanks, read_frequency_ranks, task_subsets
from .validate import (
    SKIP_HINT,
    PhraseCutFormatError,
    check_image_entry,
    check_task,
    read_image_bytes,
    read_json_list,
)

logger = logging.getLogger(__name__)

# Dataset split name -> the refer file it comes from. refer_val.json excludes the 100 miniv images.
SPLIT_FILES = {
    "train": "refer_train.json",
    "validation": "refer_val.json",
    "test": "refer_test.json",
    "miniv": "refer_miniv.json",
}
SPLIT_ALIASES = {"val": "validation"}

# Images whose metadata size does not match the JPEG (CLIPSeg's `invalid_img_ids`,
# timojl/clipseg datasets/phrasecut.py): always left out, and counted.
KNOWN_BAD_IMAGE_IDS = frozenset({
    150417, 285665, 498246, 61564, 285743, 498269, 498010, 150516, 150344,
    286093, 61530, 150333, 286065, 285814, 498187, 285761, 498042,
})  # fmt: skip

SKIP_REPORT_FILENAME = "phrasecut_skip_report.json"

_POINT = datasets.List(datasets.Value("float64"), length=2)
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "coco_id": datasets.Value("int64"),  # null when the image is not in COCO
        "tasks": datasets.List(
            {
                "task_id": datasets.Value("string"),
                "phrase": datasets.Value("string"),
                "phrase_structure": {
                    "name": datasets.Value("string"),
                    "attributes": datasets.List(datasets.Value("string")),
                    "relation_ids": datasets.List(datasets.Value("int64")),
                    "relation_descriptions": datasets.List(
                        {"predicate": datasets.Value("string"), "object": datasets.Value("string")}
                    ),
                    "type": datasets.Value("string"),
                },
                # instances -> polygons -> points [x, y], original-image pixels, not closed
                "polygons": datasets.List(datasets.List(datasets.List(_POINT))),
                "instance_boxes": datasets.List(datasets.List(datasets.Value("float64"), length=4)),  # xywh
                "ann_ids": datasets.List(datasets.Value("int64")),
                "subsets": datasets.List(datasets.Value("string")),
            }
        ),
    }
)

CITATION = """@inproceedings{wu2020phrasecut,
  title={PhraseCut: Language-based Image Segmentation in the Wild},
  author={Wu, Chenyun and Lin, Zhe and Cohen, Scott and Bui, Trung and Maji, Subhransu},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2020}
}"""

# The modules whose code decides what ends up in a row: editing any of them must re-prepare the data.
_ROW_MODULES = ("builder.py", "validate.py", "masks.py", "subsets.py")


def source_hash() -> str:
    """A short hash of the code that produces the rows; it keys the prepared cache."""
    digest = hashlib.sha256()
    for name in _ROW_MODULES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def normalise_splits(splits: str | Sequence[str] | None) -> tuple[str, ...]:
    """Split names in builder order; "val" means "validation". Unknown names raise PhraseCutFormatError."""
    if splits is None:
        return tuple(SPLIT_FILES)
    if isinstance(splits, str):
        splits = [splits]
    chosen = set()
    for split in splits:
        split = SPLIT_ALIASES.get(split, split)
        if split not in SPLIT_FILES:
            raise PhraseCutFormatError(
                f"unknown split {split!r}; choose from {', '.join(SPLIT_FILES)} ('val' also works)."
            )
        chosen.add(split)
    return tuple(s for s in SPLIT_FILES if s in chosen)


@dataclass
class PhraseCutConfig(datasets.BuilderConfig):
    """`skip_bad`: skip (and count) bad images and tasks instead of raising. `splits`: which splits to prepare."""

    skip_bad: bool = False
    splits: tuple[str, ...] | None = None  # None: all four


class _SkipCounter:
    """Per-split tally of what was kept and what was skipped, by reason."""

    def __init__(self):
        self.images_kept = 0
        self.tasks_kept = 0
        self.known_bad_images = 0
        self.images: Counter = Counter()
        self.tasks: Counter = Counter()

    def as_dict(self) -> dict:
        return {
            "images_kept": self.images_kept,
            "tasks_kept": self.tasks_kept,
            "known_bad_images_skipped": self.known_bad_images,
            "images_skipped": dict(sorted(self.images.items())),
            "tasks_skipped": dict(sorted(self.tasks.items())),
        }


def _task_image_id(task, position: int, refer_path: Path) -> int:
    if not isinstance(task, dict) or not isinstance(task.get("image_id"), int):
        task_id = task.get("task_id", "?") if isinstance(task, dict) else "?"
        raise PhraseCutFormatError(
            f"{refer_path}: entry {position} (task {task_id}) has no integer 'image_id'; {SKIP_HINT}.",
            "missing_field",
        )
    return task["image_id"]


def _first_occurrence(task: dict, position: int, refer_path: Path, seen: dict) -> bool:
    """Record the task's id at its first entry (True); a later entry with the same id would be scored twice."""
    task_id = str(task.get("task_id", "?"))
    if task_id in seen:
        raise PhraseCutFormatError(
            f"{refer_path}: entry {position} repeats task {task_id} (first at entry {seen[task_id]}), so it would "
            f"be trained on and scored more than once; {SKIP_HINT} (the first entry is kept).",
            "duplicate_task_id",
        )
    if "task_id" in task:  # a task without an id is refused by check_task, with its own reason
        seen[task_id] = position
    return True


def summary_line(split: str, report: dict) -> str:
    """One log line: what a split kept and what it skipped, by reason."""
    line = f"PhraseCut {split}: kept {report['images_kept']} images / {report['tasks_kept']} tasks"
    if not (report["known_bad_images_skipped"] or report["images_skipped"] or report["tasks_skipped"]):
        return line + "; nothing skipped"

    def by_reason(counts: dict) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in counts.items()) or "none"

    return (
        f"{line}; skipped {report['known_bad_images_skipped']} known bad images (metadata size != JPEG size), "
        f"{sum(report['images_skipped'].values())} images ({by_reason(report['images_skipped'])}), "
        f"{sum(report['tasks_skipped'].values())} tasks ({by_reason(report['tasks_skipped'])})"
    )


class PhraseCut(datasets.GeneratorBasedBuilder):
    """PhraseCut (Wu et al., CVPR 2020) from its on-disk layout: one row per image with all of its tasks.

    Pass `data_dir` (the VGPhraseCut_v0 folder); config kwargs `skip_bad=True` and `splits=[...]`.
    Images and tasks that fail validation raise `PhraseCutFormatError` unless `skip_bad=True`, in
    which case they are skipped and counted (see `skip_report`). The 17 known bad images are
    always left out and counted. Image bytes are embedded, so the prepared data outlives the raw folder.
    """

    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = PhraseCutConfig
    BUILDER_CONFIGS = [PhraseCutConfig(name="default", version=VERSION)]
    DEFAULT_CONFIG_NAME = "default"
    DEFAULT_WRITER_BATCH_SIZE = 100  # rows carry whole JPEGs: keep the writer's in-memory batches small

    def __init__(self, *args, **kwargs):
        # datasets keys the cache on the config only; the code's hash makes edits re-prepare the data.
        kwargs.setdefault("hash", source_hash())
        kwargs.setdefault("dataset_name", "phrasecut")  # not the module's name ("builder")
        if kwargs.get("splits") is not None:  # fail early on a wrong name, and cache "val" as "validation"
            kwargs["splits"] = normalise_splits(kwargs["splits"])
        super().__init__(*args, **kwargs)
        self._skip_counts: dict[str, _SkipCounter] = {}

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="PhraseCut: language-based image segmentation in the wild, one row per image.",
            features=FEATURES,
            homepage="https://github.com/ChenyunWu/PhraseCutDataset",
            license="PhraseCut annotations: unspecified; Visual Genome annotations: CC BY 4.0; "
            "images: their own per-image terms",
            citation=CITATION,
        )

    # -- preparation --------------------------------------------------------------------------------

    def _data_dir(self) -> Path:
        if not self.config.data_dir:
            raise PhraseCutFormatError(
                "no data_dir given: pass data_dir=<path to the VGPhraseCut_v0 folder>."
            )
        data_dir = Path(self.config.data_dir).expanduser()
        if not data_dir.is_dir():
            raise PhraseCutFormatError(
                f"data_dir {data_dir} is not a directory; point it at the VGPhraseCut_v0 folder."
            )
        if not (data_dir / "image_data_split.json").is_file():
            hint = ""
            if (data_dir / "VGPhraseCut_v0").is_dir():
                hint = f" Did you mean {data_dir / 'VGPhraseCut_v0'}?"
            raise PhraseCutFormatError(
                f"data_dir {data_dir} is not a PhraseCut folder: image_data_split.json is missing "
                f"(expected refer_*.json, image_data_split.json and images/ inside).{hint}"
            )
        return data_dir

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        data_dir = self._data_dir()
        splits = normalise_splits(self.config.splits)
        for split in splits:
            refer_path = data_dir / SPLIT_FILES[split]
            if not refer_path.is_file():
                raise PhraseCutFormatError(
                    f"{refer_path} is missing for split {split!r}; pass splits=[...] with the splits you have."
                )
        if not (data_dir / "images").is_dir():
            raise PhraseCutFormatError(
                f"{data_dir / 'images'} is missing: the images belong in images/<image_id>.jpg."
            )
        images = self._read_image_metadata(data_dir)
        ranks = self._read_ranks(data_dir)
        return [
            datasets.SplitGenerator(
                name=split,
                gen_kwargs={
                    "refer_path": data_dir / SPLIT_FILES[split],
                    "images": images,
                    "ranks": ranks,
                    "split": split,
                },
            )
            for split in splits
        ]

    def _read_image_metadata(self, data_dir: Path) -> dict:
        """image_id -> raw metadata entry (validated lazily, only for images that have tasks)."""
        entries = read_json_list(data_dir / "image_data_split.json", "image metadata")
        by_id = {}
        for entry in entries:
            if isinstance(entry, dict) and "image_id" in entry:
                by_id[entry["image_id"]] = entry
        return by_id

    def _read_ranks(self, data_dir: Path) -> FrequencyRanks | None:
        path = data_dir / "name_att_rel_count.json"
        if not path.is_file():
            logger.warning(
                "%s not found: the frequency-rank subsets (c20, c100, ..., a20, ...) are left out of every task.",
                path,
            )
            return None
        try:
            return read_frequency_ranks(path)
        except (ValueError, KeyError, TypeError) as error:
            raise PhraseCutFormatError(
                f"{path}: expected {{'cat': [[name, count], ...], 'att': [...], 'rel': [...]}} ({error!r}); "
                "re-download it, or delete it to leave out the frequency-rank subsets."
            ) from None

    def _generate_examples(
        self, refer_path: Path, images: dict, ranks: FrequencyRanks | None, split: str
    ) -> Iterator:
        counter = self._skip_counts[split] = _SkipCounter()
        tasks_by_image = self._group_tasks(read_json_list(refer_path, f"{split} tasks"), refer_path, counter)
        for index, (image_id, raw_tasks) in enumerate(tasks_by_image.items()):
            if image_id in KNOWN_BAD_IMAGE_IDS:
                counter.known_bad_images += 1
                continue
            row = self._skippable(
                counter.images, self._make_row, image_id, raw_tasks, images, ranks, refer_path, counter
            )
            if row is not None:
                counter.images_kept += 1
                counter.tasks_kept += len(row["tasks"])
                yield Key(0, index), row
        skipped = counter.known_bad_images or counter.images or counter.tasks
        logger.log(logging.WARNING if skipped else logging.INFO, summary_line(split, counter.as_dict()))

    def _skippable(self, counts: Counter, make, *args):
        """Return `make(*args)`; with skip_bad, a skippable PhraseCutFormatError is counted by reason instead."""
        try:
            return make(*args)
        except PhraseCutFormatError as error:
            if not (self.config.skip_bad and error.reason):
                raise
            counts[error.reason] += 1
            logger.debug("skipped: %s", error)
            return None

    def _group_tasks(self, raw_tasks: list, refer_path: Path, counter: _SkipCounter) -> dict:
        """image_id -> its tasks, images in order of first appearance, tasks in file order."""
        by_image: dict = {}
        seen: dict = {}  # task id -> entry of its first occurrence
        for position, task in enumerate(raw_tasks):
            image_id = self._skippable(counter.tasks, _task_image_id, task, position, refer_path)
            if image_id is None:
                continue
            if not self._skippable(counter.tasks, _first_occurrence, task, position, refer_path, seen):
                continue
            by_image.setdefault(image_id, []).append(task)
        return by_image

    def _make_row(
        self,
        image_id: int,
        raw_tasks: list,
        images: dict,
        ranks: FrequencyRanks | None,
        refer_path: Path,
        counter: _SkipCounter,
    ) -> dict:
        first_task = raw_tasks[0].get("task_id", "?")
        if image_id not in images:
            raise PhraseCutFormatError(
                f"image {image_id} (task {first_task} in {refer_path.name}) has no entry in image_data_split.json; "
                f"{SKIP_HINT}.",
                "no_image_metadata",
            )
        meta = check_image_entry(images[image_id], f"image_data_split.json entry for image {image_id}")
        width, height = meta["width"], meta["height"]
        image_path = Path(self.config.data_dir).expanduser() / "images" / f"{image_id}.jpg"
        image_bytes = read_image_bytes(image_path, width, height, f"task {first_task} in {refer_path.name}")

        tasks = []
        for raw in raw_tasks:
            task = self._skippable(counter.tasks, check_task, raw, width, height, refer_path.name)
            if task is None:
                continue
            mask = polygons_to_mask(task["polygons"], height, width)
            relative_size = float(mask.sum()) / (width * height)
            task["subsets"] = task_subsets(
                task["phrase_structure"], len(task["polygons"]), relative_size, meta["coco_id"], ranks
            )
            task["polygons"] = [[points.tolist() for points in instance] for instance in task["polygons"]]
            task["instance_boxes"] = task["instance_boxes"].tolist()
            tasks.append(task)
        if not tasks:
            raise PhraseCutFormatError(f"image {image_id}: none of its tasks is valid.", "no_valid_tasks")
        return {
            "image": {"bytes": image_bytes, "path": f"{image_id}.jpg"},
            "image_id": image_id,
            "width": width,
            "height": height,
            "coco_id": meta["coco_id"],
            "tasks": tasks,
        }

    def _download_and_prepare(self, dl_manager, verification_mode, **prepare_splits_kwargs):
        super()._download_and_prepare(dl_manager, verification_mode, **prepare_splits_kwargs)
        # Written into the (still temporary) output folder, so it appears only with complete data.
        report = {split: counter.as_dict() for split, counter in self._skip_counts.items()}
        with open(Path(self._output_dir) / SKIP_REPORT_FILENAME, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)

    def download_and_prepare(self, *args, **kwargs):
        """As in `datasets`, but a bad-data error surfaces as the `PhraseCutFormatError` that names the problem."""
        try:
            return super().download_and_prepare(*args, **kwargs)
        except DatasetGenerationError as error:
            if isinstance(error.__cause__, PhraseCutFormatError):
                raise error.__cause__ from None
            raise

    def as_dataset_dict(self) -> datasets.DatasetDict:
        """The prepared splits, in builder order; a split with no images is an empty Dataset, not an error."""
        return datasets.DatasetDict(
            {
                split: self.as_dataset(split=split)
                if info.num_examples
                else datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
                for split, info in self.info.splits.items()
            }
        )

    @property
    def skip_report(self) -> dict:
        """Per split: images/tasks kept, known bad images left out, and images/tasks skipped by reason."""
        if self._skip_counts:
            return {split: counter.as_dict() for split, counter in self._skip_counts.items()}
        path = Path(self.cache_dir) / SKIP_REPORT_FILENAME
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        return {}


def prepare_phrasecut(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    splits: str | Sequence[str] | None = None,
    skip_bad: bool = False,
) -> PhraseCut:
    """Prepare PhraseCut from `data_dir` once (later calls reuse the cache) and return the builder.

    Use `builder.as_dataset_dict()` for the splits and `builder.skip_report` for what was left out.
    Arguments as in `load_phrasecut`.
    """
    builder = PhraseCut(
        data_dir=str(data_dir),
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        skip_bad=skip_bad,
        splits=splits,
    )
    already_prepared = (Path(builder.cache_dir) / "dataset_info.json").is_file()
    builder.download_and_prepare()
    if already_prepared:  # the generator did not run: repeat its summary from the saved report
        for split, report in builder.skip_report.items():
            logger.info(summary_line(split, report))
    return builder


def load_phrasecut(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    splits: str | Sequence[str] | None = None,
    skip_bad: bool = False,
) -> datasets.DatasetDict:
    """Prepare PhraseCut from `data_dir` (once; later calls reuse the cache) and return its splits.

    `splits`: any of "train", "validation" (or "val"), "test", "miniv"; all four by default.
    `skip_bad`: skip and count bad images/tasks instead of raising `PhraseCutFormatError`.
    What was kept and skipped is logged; `prepare_phrasecut(...).skip_report` returns it.
    """
    return prepare_phrasecut(data_dir, cache_dir, splits, skip_bad).as_dataset_dict()
