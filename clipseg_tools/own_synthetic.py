"""Synthetic data in the shapes users bring (see `own_data`), written offline so that the README's
"your own data" commands and the tests run as they stand:

    python -m clipseg_tools.own_synthetic --output_dir my_data --images 200

writes `my_data/data/train-00000-of-00001.parquet` (and `test-...`): referring rows with an `image`, a list of
binary `mask` images and, per mask, a list of prompts (`prompt`), as a Parquet folder that
`datasets.load_dataset("my_data")` reads. The pictures are those of the synthetic PhraseCut writer (coloured
shapes on textures); its phrases become the prompts, with a second wording for each.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from phrasecut_dataset import load_phrasecut, write_synthetic_phrasecut
from phrasecut_dataset.masks import polygons_to_mask

from .cli import ArgumentParser, run_command
from .errors import CommandError
from .files import atomic_folder

REFERRING_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "mask": datasets.List(datasets.Image()),
        "prompt": datasets.List(datasets.List(datasets.Value("string"))),
    }
)


def _png(mask: np.ndarray) -> dict:
    encoded = io.BytesIO()
    Image.fromarray(mask).save(encoded, format="PNG")
    return {"bytes": encoded.getvalue(), "path": None}


def referring_rows(split: datasets.Dataset) -> dict[str, list]:
    """One referring row per image of a prepared synthetic PhraseCut split: its masks and their prompts."""
    rows = {"image": [], "mask": [], "prompt": []}
    for row in split:
        height, width = int(row["height"]), int(row["width"])
        rows["image"].append({"bytes": row["image"]["bytes"], "path": None})
        rows["mask"].append([_png(polygons_to_mask(t["polygons"], height, width)) for t in row["tasks"]])
        rows["prompt"].append([[t["phrase"], f"the {t['phrase']}"] for t in row["tasks"]])
    return rows


def write_referring(output_dir: str | Path, num_images: dict[str, int], seed: int = 0) -> Path:
    """A Parquet folder of referring rows, one file per split (e.g. {"train": 200, "test": 50})."""
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory() as scratch, atomic_folder(output_dir) as staging:
        raw = write_synthetic_phrasecut(Path(scratch) / "raw", num_images, seed=seed)
        splits = [name for name, count in num_images.items() if count]
        prepared = load_phrasecut(raw, cache_dir=Path(scratch) / "cache", splits=splits)
        prepared = prepared.cast_column("image", datasets.Image(decode=False))
        (staging / "data").mkdir()
        for name in splits:
            part = datasets.Dataset.from_dict(referring_rows(prepared[name]), features=REFERRING_FEATURES)
            part.to_parquet(staging / "data" / f"{name}-00000-of-00001.parquet")
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Write synthetic referring rows (images, masks, prompts) as Parquet.")
    parser.add_argument("--output_dir", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--images", type=int, default=200, help="training images (a quarter more for test)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the pictures and prompts")
    args = parser.parse_args(argv)
    if Path(args.output_dir).exists():
        raise CommandError(f"--output_dir {args.output_dir} exists: choose a new folder")
    if args.images < 1:
        parser.error("--images must be at least 1")
    folder = write_referring(
        args.output_dir, {"train": args.images, "test": max(1, args.images // 4)}, args.seed
    )
    print(f"wrote {folder}/data/ (train: {args.images} images, test: {max(1, args.images // 4)})")


if __name__ == "__main__":
    run_command(main)
