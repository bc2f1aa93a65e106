"""Synthetic data in the shapes users bring (see `own_data`, `semantic_data`, `coco_data`), written offline so
that the README's "your own data" commands and the tests run as they stand:

    python -m clipseg_tools.own_synthetic --output_dir my_data --images 200 [--shape referring|semantic|coco]

- referring (default): `my_data/data/train-00000-of-00001.parquet` (and `test-...`), rows with an `image`, a
  list of binary `mask` images and, per mask, a list of prompts (`prompt`), as a Parquet folder that
  `datasets.load_dataset("my_data")` reads. The pictures are those of the synthetic PhraseCut writer (coloured
  shapes on textures); its phrases become the prompts, with a second wording for each.
- semantic: Parquet `train` and `validation` splits of `image` and `label` (a map of class ids: background,
  circle, square, triangle; 255 on each shape's outline), with `id2label.json` beside them.
- coco: `annotations/instances_train.json` and `instances_val.json` with their image folders `train/`, `val/`.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

from phrasecut_dataset import load_phrasecut, write_synthetic_phrasecut
from phrasecut_dataset.masks import polygons_to_mask
from phrasecut_dataset.synthetic import COLOURS, SHAPES, _layout, _render

from .cli import ArgumentParser, run_command
from .coco_data import encode_rle
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


SEMANTIC_CLASSES = {0: "background", 1: "circle", 2: "square", 3: "triangle"}
SEMANTIC_FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})


def semantic_example(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An RGB picture of 1-3 coloured shapes on noise and its label map: 0 background, the shape's class
    inside, 255 (ignore) on a 2-pixel ring along each shape's outline, as Pascal VOC marks its boundaries."""
    width, height = int(rng.integers(56, 97)), int(rng.integers(56, 97))
    pixels = rng.integers(60, 140, size=(height, width, 3), dtype=np.uint8)
    image, label = Image.fromarray(pixels), Image.new("L", (width, height), 0)
    draw, paint = ImageDraw.Draw(image), ImageDraw.Draw(label)
    for _ in range(int(rng.integers(1, 4))):
        class_id = int(rng.integers(1, len(SEMANTIC_CLASSES)))
        radius = int(rng.integers(8, min(width, height) // 3))
        x, y = int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius))
        box = (x - radius, y - radius, x + radius, y + radius)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        for canvas, fill, outline in ((draw, colour, colour), (paint, class_id, 255)):
            if class_id == 1:
                canvas.ellipse(box, fill=fill, outline=outline, width=2)
            elif class_id == 2:
                canvas.rectangle(box, fill=fill, outline=outline, width=2)
            else:
                corners = [(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)]
                canvas.polygon(corners, fill=fill, outline=outline, width=2)
    return np.asarray(image), np.asarray(label)


def write_semantic(output_dir: str | Path, num_images: dict[str, int], seed: int = 0) -> Path:
    """A Parquet folder of semantic rows (`image`, `label`: a map of class ids) with its `id2label.json`."""
    output_dir = Path(output_dir)
    rng = np.random.default_rng(seed)
    with atomic_folder(output_dir) as staging:
        (staging / "data").mkdir()
        for name, count in num_images.items():
            examples = [semantic_example(rng) for _ in range(count)]
            rows = {
                "image": [_encoded_image(image, "PNG") for image, _ in examples],
                "label": [_encoded_image(label, "PNG") for _, label in examples],
            }
            part = datasets.Dataset.from_dict(rows, features=SEMANTIC_FEATURES)
            part.to_parquet(staging / "data" / f"{name}-00000-of-00001.parquet")
        (staging / "id2label.json").write_text(json.dumps({str(k): v for k, v in SEMANTIC_CLASSES.items()}))
    return output_dir


def _encoded_image(array: np.ndarray, format: str) -> dict:
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format=format)
    return {"bytes": encoded.getvalue(), "path": None}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Write synthetic segmentation data in the shapes users bring.")
    parser.add_argument("--output_dir", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--images", type=int, default=200, help="training images (a quarter more held out)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the pictures and prompts")
    parser.add_argument(
        "--shape",
        choices=sorted(WRITERS),
        default="referring",
        help="referring rows (Parquet), semantic label maps (Parquet + id2label.json), or COCO instances",
    )
    args = parser.parse_args(argv)
    if Path(args.output_dir).exists():
        raise CommandError(f"--output_dir {args.output_dir} exists: choose a new folder")
    if args.images < 1:
        parser.error("--images must be at least 1")
    write, held_out_name = WRITERS[args.shape]
    held_out = max(1, args.images // 4)
    folder = write(args.output_dir, {"train": args.images, held_out_name: held_out}, args.seed)
    print(f"wrote {folder}/ ({args.shape}; train: {args.images} images, {held_out_name}: {held_out})")


def write_coco(output_dir: str | Path, num_images: dict[str, int], seed: int = 0) -> Path:
    """A folder in COCO's layout (`annotations/instances_<split>.json`, the images in `<split>/`) of the synthetic
    pictures, e.g. {"train": 200, "val": 50}: each shape is an instance of its "<colour> <shape>" category.
    Most segmentations are polygons, every sixth annotation uncompressed and every sixth compressed RLE, and
    in every third image one shape is a crowd region (uncompressed RLE, as COCO writes crowds). As in COCO,
    the category ids have gaps and the file lists the categories out of id order. Deterministic."""
    categories = [
        {"id": 10 * c + s + 11, "name": f"{colour} {shape}", "supercategory": shape}
        for c, colour in enumerate(COLOURS)
        for s, shape in enumerate(SHAPES)
    ]
    category_id = {category["name"]: category["id"] for category in categories}
    ann_id = 0
    with atomic_folder(output_dir) as staging:
        (staging / "annotations").mkdir()
        for split_index, (split, count) in enumerate(num_images.items()):
            (staging / split).mkdir()
            images, annotations = [], []
            for index in range(count):
                # Each image has its own generator, so an image does not depend on the ones before it.
                rng = np.random.default_rng([seed, split_index, index])
                width, height = (int(v) for v in rng.integers(160, 321, size=2))
                shapes = _layout(rng, width, height)  # the PhraseCut writer's pictures: the same visual world
                image_id = 100_000 * (split_index + 1) + index
                name = f"{image_id:012d}.jpg"
                _render(rng, width, height, shapes).save(staging / split / name, quality=90, subsampling=0)
                images.append({"id": image_id, "file_name": name, "width": width, "height": height})
                for k, shape in enumerate(shapes):
                    ann_id += 1
                    crowd = index % 3 == 0 and k == len(shapes) - 1
                    mask = polygons_to_mask(shape.polygons, height, width)
                    if crowd or ann_id % 6 in (4, 5):
                        segmentation = encode_rle(mask, compressed=not crowd and ann_id % 6 == 5)
                    else:
                        segmentation = [[v for point in polygon for v in point] for polygon in shape.polygons]
                    xs = [x for polygon in shape.polygons for x, _ in polygon]
                    ys = [y for polygon in shape.polygons for _, y in polygon]
                    box = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
                    annotations.append(
                        {
                            "id": ann_id,
                            "image_id": image_id,
                            "category_id": category_id[f"{shape.colour} {shape.shape}"],
                            "segmentation": segmentation,
                            "area": float(mask.sum()),
                            "bbox": box,
                            "iscrowd": int(crowd),
                        }
                    )
            listed = sorted(categories, key=lambda category: category["name"])
            data = {"info": {"description": "synthetic shapes"}, "licenses": [], "images": images}
            data.update(annotations=annotations, categories=listed)
            path = staging / "annotations" / f"instances_{split}.json"
            path.write_text(json.dumps(data), encoding="utf-8")
    return Path(output_dir)


# --shape: the writer and the name of its held-out split.
WRITERS = {
    "referring": (write_referring, "test"),
    "semantic": (write_semantic, "validation"),
    "coco": (write_coco, "val"),
}


if __name__ == "__main__":
    run_command(main)
