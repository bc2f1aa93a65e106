"""Export prepared PhraseCut splits as a Hub-style dataset repo (Parquet shards + card), and push it.

    python -m phrasecut_dataset.publish --data_dir data/VGPhraseCut_v0 --output_dir out/phrasecut_hub \\
        [--push_to_hub --hub_dataset_id your-name/phrasecut --hub_private_repo] [--max_shard_size 500MB]

The folder it writes is laid out as `push_to_hub` lays out a repo:

    README.md                                   dataset card: YAML (dataset_info, configs) + prose
    data/<split>-00000-of-0000N.parquet         image bytes embedded

so `load_dataset("parquet", data_files=...)`, `load_dataset(<folder>)` and, once pushed,
`load_dataset("your-name/phrasecut")` all read the same rows. The push uploads that very folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import pyarrow.compute as pc
import yaml
from datasets.table import embed_table_storage
from datasets.utils.py_utils import convert_file_size_to_int

from clipseg_tools.cli import ArgumentParser, run_command, setup_logging
from clipseg_tools.errors import CommandError
from clipseg_tools.files import atomic_folder
from clipseg_tools.hub import hub_access_problem, push_folder

from .builder import CITATION, prepare_phrasecut

logger = logging.getLogger(__name__)


def _num_shards(dataset: datasets.Dataset, max_shard_size: int) -> int:
    # The same rule as Dataset.push_to_hub, so a push and an export shard alike.
    return int((dataset._estimate_nbytes() or 0) / max_shard_size) + 1


def _with_embedded_images(shard: datasets.Dataset) -> datasets.Dataset:
    """Make sure every Image cell carries its bytes (the builder's rows already do; others may hold paths)."""
    column = shard.data.column("image")
    if sum(chunk.field("bytes").null_count for chunk in column.chunks) == 0:
        return shard
    return shard.with_format("arrow").map(embed_table_storage, batched=True).with_format(**shard.format)


def write_parquet_shards(
    dataset_dict: datasets.DatasetDict, output_dir: str | Path, max_shard_size: str | int = "500MB"
) -> dict[str, list[Path]]:
    """Write each split as data/<split>-<i>-of-<n>.parquet under output_dir; returns split -> shard paths."""
    limit = convert_file_size_to_int(max_shard_size)
    data_dir = Path(output_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, dataset in dataset_dict.items():
        count = _num_shards(dataset, limit)
        paths = []
        for index in range(count):
            shard = _with_embedded_images(dataset.shard(num_shards=count, index=index, contiguous=True))
            path = data_dir / f"{split}-{index:05d}-of-{count:05d}.parquet"
            shard.to_parquet(str(path))
            paths.append(path)
        written[split] = paths
    return written


def _task_count(dataset: datasets.Dataset) -> int:
    return int(pc.sum(pc.list_value_length(dataset.data.column("tasks"))).as_py() or 0)


def card_metadata(dataset_dict: datasets.DatasetDict, shards: Mapping[str, list[Path]]) -> dict:
    """The card's YAML header: what `push_to_hub` would write (dataset_info, configs) plus licence and tags."""
    features = next(iter(dataset_dict.values())).features
    splits = [
        {"name": split, "num_bytes": int(dataset.data.nbytes), "num_examples": len(dataset)}
        for split, dataset in dataset_dict.items()
    ]
    download_size = sum(path.stat().st_size for paths in shards.values() for path in paths)
    return {
        "pretty_name": "PhraseCut",
        "language": ["en"],
        "license": "other",
        "license_name": "mixed",
        "license_details": "Visual Genome annotations: CC BY 4.0. Images: their own per-image terms. "
        "PhraseCut annotations: licence unspecified by the authors.",
        "task_categories": ["image-segmentation"],
        "tags": ["referring-expression-segmentation", "phrasecut", "visual-genome"],
        "size_categories": [_size_category(sum(len(d) for d in dataset_dict.values()))],
        "dataset_info": {
            "features": features._to_yaml_list(),
            "splits": splits,
            "download_size": download_size,
            "dataset_size": sum(s["num_bytes"] for s in splits),
        },
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*"} for split in dataset_dict],
            }
        ],
    }


def _size_category(rows: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < limit:
            return name
    return "1M<n<10M"


CARD_BODY = """
# PhraseCut (one row per image)

PhraseCut ([Wu et al., CVPR 2020](https://arxiv.org/abs/2008.01187)) is a benchmark for segmenting the
image region that a phrase describes ("white dog on grass"), built on Visual Genome images. This
copy holds one row per image with all of its phrases ("tasks"), so that an image is decoded once
for all of its phrases. It was made from the original files with this project's `phrasecut_dataset`
builder; masks are not stored but rasterised from the polygons with the official convention
(PIL, vertices truncated with int(), boundary included, union over all polygons of all instances).

## Features

| column | type | meaning |
|---|---|---|
| `image` | Image (JPEG bytes) | the Visual Genome image |
| `image_id` | int64 | Visual Genome image id |
| `width`, `height` | int32 | image size from the metadata; masks are drawn at this size |
| `coco_id` | int64, nullable | the COCO id when the image is also in COCO |
| `tasks` | list | the image's phrases, in the original file order, each with: |
| `tasks[].task_id` | string | `<image_id>__<ann_id>_<ann_id>...` |
| `tasks[].phrase` | string | the referring phrase |
| `tasks[].phrase_structure` | struct | `name`, `attributes`, `relation_ids`, `relation_descriptions` (`predicate`, `object`), `type` (name / attribute / relation / verbose) |
| `tasks[].polygons` | list | instances -> polygons -> `[x, y]` points (float64, pixels, not closed) |
| `tasks[].instance_boxes` | list | one `[x, y, w, h]` per instance (inclusive, +1 convention) |
| `tasks[].ann_ids` | list[int64] | Visual Genome object ids |
| `tasks[].subsets` | list[string] | the official evaluation subsets the task belongs to (c20, i_single, s_small, ...) |

## Splits

| split | images | tasks |
|---|---|---|
{split_rows}

`validation` is `refer_val.json`, which excludes the 100 `miniv` images. {skip_note}

## Licence

- Visual Genome annotations: Creative Commons Attribution 4.0 (CC BY 4.0).
- Images: Flickr/YFCC/COCO photographs that keep their own per-image terms.
- PhraseCut annotations: the authors state no licence; treat them as unspecified and cite the paper.

## Citation

```bibtex
{citation}
```
"""


def dataset_card(
    dataset_dict: datasets.DatasetDict,
    shards: Mapping[str, list[Path]],
    skip_report: Mapping | None = None,
    left_out: Sequence[str] = (),
) -> str:
    """The README.md text: YAML header (parsed by the Hub and by `load_dataset`) and prose. `left_out` names the
    splits that had no images and were not exported."""
    split_rows = "\n".join(
        f"| {split} | {len(dataset)} | {_task_count(dataset)} |" for split, dataset in dataset_dict.items()
    )
    skip_note = ""
    if skip_report:
        known_bad = sum(r.get("known_bad_images_skipped", 0) for r in skip_report.values())
        other = sum(sum(r.get("images_skipped", {}).values()) for r in skip_report.values())
        tasks = sum(sum(r.get("tasks_skipped", {}).values()) for r in skip_report.values())
        skip_note = (
            f"Left out while preparing: {known_bad} images whose metadata size does not match the JPEG "
            f"(the known bad images), {other} other images and {tasks} tasks that failed validation."
        )
    if left_out:
        skip_note += (
            f" The {', '.join(left_out)} split{'s' if len(left_out) > 1 else ''} had no images and "
            f"{'are' if len(left_out) > 1 else 'is'} left out (an empty split cannot be loaded back)."
        )
    header = yaml.safe_dump(card_metadata(dataset_dict, shards), sort_keys=False, allow_unicode=True)
    body = CARD_BODY.format(split_rows=split_rows, skip_note=skip_note.strip(), citation=CITATION)
    return f"---\n{header}---\n{body}"


EXPORT_ENTRIES = ("README.md", "data")  # what an export folder holds: the card and the Parquet shards


def export_dataset(
    dataset_dict: datasets.DatasetDict,
    output_dir: str | Path,
    max_shard_size: str | int = "500MB",
    skip_report: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Write Parquet shards and the dataset card to output_dir, laid out like a Hub dataset repo.

    `dataset_dict` holds the splits as `load_phrasecut` returns them (after a `select` or `shuffle`,
    call `flatten_indices()` first: sizes and counts are read from the underlying Arrow tables).
    A split without images is left out, saying so in the log and the card: `load_dataset` cannot load an
    empty split back. Written under a temporary name and renamed when complete, so a crash leaves no half export.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty; choose another --output_dir or pass --overwrite_output_dir."
        )
    foreign = sorted(p.name for p in output_dir.glob("*") if p.name not in EXPORT_ENTRIES)
    if foreign:  # an overwrite replaces the whole folder: only an earlier export's
        raise FileExistsError(
            f"{output_dir} holds files that are not an export's ({', '.join(foreign[:5])}); --overwrite_output_dir "
            "replaces an earlier export only: choose another --output_dir"
        )
    dataset_dict, left_out = _without_empty_splits(dataset_dict)
    with atomic_folder(output_dir) as staging:
        shards = write_parquet_shards(dataset_dict, staging, max_shard_size)
        card = dataset_card(dataset_dict, shards, skip_report, left_out)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return output_dir


def _without_empty_splits(dataset_dict: datasets.DatasetDict) -> tuple[datasets.DatasetDict, list[str]]:
    """The splits that have rows, and the names of those left out. An empty split's Parquet file loads as
    "Instruction 'test' corresponds to no data", failing the whole `load_dataset`."""
    left_out = [split for split, dataset in dataset_dict.items() if len(dataset) == 0]
    if len(left_out) == len(dataset_dict):
        raise CommandError(
            f"no split has any image ({', '.join(left_out) or 'no splits given'}): there is nothing to export"
        )
    for split in left_out:
        logger.warning(
            f"the {split} split has no images and is left out of the export (an empty split cannot be loaded back)"
        )
    kept = datasets.DatasetDict({split: d for split, d in dataset_dict.items() if split not in left_out})
    return kept, left_out


def export_files(export_dir: Path) -> list[str]:
    """What `export_dataset` writes: the card and the Parquet shards under data/ (nothing else a user put
    there, hidden or not)."""
    shards = sorted(p.relative_to(export_dir).as_posix() for p in (export_dir / "data").rglob("*.parquet"))
    return ["README.md", *shards]


def push_export_to_hub(
    export_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Upload an `export_dataset` folder as the dataset repo `repo_id` in one commit; returns the commit URL.

    Shards left under data/ by an earlier push, and not part of this export, are deleted in the
    same commit (as `push_to_hub` does), so the repo holds exactly the exported files.
    """
    export_dir = Path(export_dir)
    return push_folder(
        export_dir,
        repo_id,
        repo_type="dataset",
        files=export_files(export_dir),
        what="The export",
        replace_under="data/",
        private=private,
        token=token,
        commit_message="Upload PhraseCut (one row per image)",
    )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        description="Export PhraseCut to Parquet shards with a dataset card, and push it."
    )
    parser.add_argument("--data_dir", required=True, help="the raw PhraseCut folder (VGPhraseCut_v0)")
    parser.add_argument("--output_dir", required=True, help="where to write README.md and data/*.parquet")
    parser.add_argument("--cache_dir", help="datasets cache for the prepared splits")
    parser.add_argument("--splits", nargs="+", help="splits to export (default: all four)")
    parser.add_argument(
        "--skip_bad_samples",
        "--skip_bad",
        dest="skip_bad",
        action="store_true",
        help="skip (and count) broken images and tasks instead of stopping",
    )
    parser.add_argument("--max_shard_size", default="500MB", help="largest Parquet shard")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace a non-empty --output_dir"
    )
    parser.add_argument("--push_to_hub", action="store_true", help="upload the export to the Hub")
    parser.add_argument("--hub_dataset_id", help="dataset repo to push to, e.g. your-name/phrasecut")
    parser.add_argument("--hub_token", help="Hub token (default: the logged-in one)")
    parser.add_argument(
        "--hub_private_repo",
        "--private",
        dest="private",
        action="store_true",
        help="create the repository private",
    )
    args = parser.parse_args(argv)
    if args.push_to_hub:
        if not args.hub_dataset_id:
            parser.error("--push_to_hub needs --hub_dataset_id (e.g. your-name/phrasecut).")
        problem = hub_access_problem(args.hub_token)  # before the export, not after it
        if problem:
            parser.error(f"--push_to_hub: {problem}")
    setup_logging()

    builder = prepare_phrasecut(
        args.data_dir, cache_dir=args.cache_dir, splits=args.splits, skip_bad=args.skip_bad
    )
    splits = builder.as_dataset_dict()
    try:
        out = export_dataset(
            splits, args.output_dir, args.max_shard_size, builder.skip_report, args.overwrite_output_dir
        )
    except FileExistsError as error:
        raise CommandError(str(error)) from error
    logger.info(f"exported {', '.join(f'{s}: {len(d)} images' for s, d in splits.items())} to {out}")
    if args.push_to_hub:
        url = push_export_to_hub(out, args.hub_dataset_id, private=args.private, token=args.hub_token)
        logger.info(f"pushed to {url}")


if __name__ == "__main__":
    run_command(main)
