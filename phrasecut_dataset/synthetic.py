"""A small synthetic PhraseCut in exactly the real on-disk layout and schema, for tests and demos.

Each image holds 2-4 coloured shapes on a textured background (noise, gradient or stripes). Phrases
are built from their phrase structure with PhraseCut's own rule ("small red circle", "blue square
left of triangle"), and every phrase's region is the set of shapes that satisfy it, so the data is
learnable and never ambiguous. Shapes are drawn from the very polygons that are written out (with
the official rasteriser's convention), so polygons, boxes and pixels agree.

    python -m phrasecut_dataset.synthetic --output_dir data/synthetic --num_train 2000 \\
        --num_val 200 --num_test 200 --num_miniv 50 --seed 0

Same seed, same arguments: byte-identical files.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipseg_tools.cli import ArgumentParser, plural, run_command, setup_logging
from clipseg_tools.files import atomic_folder

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "orange": (245, 140, 30),
    "purple": (145, 55, 185),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZE_WORDS = ("small", "large")
PREDICATES = ("left of", "right of", "above", "below")
FILE_SPLITS = ("train", "val", "test", "miniv")  # the names used on disk and in image_data_split.json

# Object extent (circumscribed diameter) relative to the short image side: large enough to be
# learnable at low resolution. Below SMALL_BELOW a shape is "small", above LARGE_ABOVE "large".
MIN_EXTENT, MAX_EXTENT = 0.20, 0.45
SMALL_BELOW, LARGE_ABOVE = 0.27, 0.38
PLACEMENT_MARGIN = 6  # pixels kept free between shapes' boxes, so no shape hides another


def synthetic_vocabulary() -> list[str]:
    """Every word that can appear in a synthetic phrase (sorted): shapes, colours, sizes, relation words."""
    words = set(SHAPES) | set(COLOURS) | set(SIZE_WORDS)
    for predicate in PREDICATES:
        words.update(predicate.split())
    return sorted(words)


def construct_phrase(phrase_structure: Mapping) -> str:
    """PhraseCut's phrase rule: attributes go before the name, one by one (so the last one ends up first),
    except multi-word attributes that start with a preposition-like word or an -ing word, which follow
    it; then " predicate object" for each relation; whitespace collapsed."""
    trailing_first_words = {"in", "on", "for", "of", "with", "made", "to", "not", "turned", "off", "from"}
    phrase = phrase_structure["name"]
    for attribute in phrase_structure["attributes"]:
        words = attribute.split()
        follows_name = len(words) > 1 and (
            words[0] in trailing_first_words
            or (words[0].endswith("ing") and words[0] not in {"living", "king", "ping", "ceiling"})
        )
        phrase = f"{phrase} {attribute}" if follows_name else f"{attribute} {phrase}"
    for predicate, supporting_object in phrase_structure["relation_descriptions"]:
        phrase += f" {predicate} {supporting_object}"
    return " ".join(phrase.split())


# -- shapes --------------------------------------------------------------------------------------------


@dataclass
class _Shape:
    shape: str
    colour: str
    size_word: str | None
    centre: tuple[float, float]
    polygons: list[list[list[float]]]  # one or two polygons of [x, y] points
    ann_id: int = 0
    box: list[float] = field(default_factory=list)


# shape -> (number of vertices, angle of the first vertex in degrees, radii cycled over the vertices)
_OUTLINES = {
    "circle": (48, 0.0, (1.0,)),
    "square": (4, 45.0, (1.0,)),
    "triangle": (3, -90.0, (1.0,)),
    "hexagon": (6, 0.0, (1.0,)),
    "star": (10, -90.0, (1.0, 0.45)),
}


def _outline(cx: float, cy: float, radius: float, shape: str, rotation: float) -> np.ndarray:
    """The shape's vertices [N, 2], inscribed in a circle of `radius` around (cx, cy)."""
    count, start, radii = _OUTLINES[shape]
    angles = np.deg2rad(start + rotation + 360.0 * np.arange(count) / count)
    r = radius * np.resize(np.asarray(radii), count)
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)


def _clip_half_plane(points: np.ndarray, axis: int, limit: float, keep_below: bool) -> np.ndarray:
    """Sutherland-Hodgman against one axis-aligned line: keep the part with coordinate <= (or >=) limit."""
    sign = 1.0 if keep_below else -1.0
    kept = []
    for p, q in zip(points, np.roll(points, -1, axis=0)):
        dp, dq = sign * (p[axis] - limit), sign * (q[axis] - limit)
        if dp <= 0:
            kept.append(p)
        if dp * dq < 0:
            kept.append(p + dp / (dp - dq) * (q - p))
    return np.asarray(kept)


def _split_in_two(points: np.ndarray, cx: float, gap: float) -> list[np.ndarray]:
    """An instance seen through a gap (as if behind a thin pole): two polygons, left and right of cx."""
    return [
        _clip_half_plane(points, 0, cx - gap / 2, keep_below=True),
        _clip_half_plane(points, 0, cx + gap / 2, keep_below=False),
    ]


def _as_json_points(points: np.ndarray) -> list[list[float]]:
    # Two decimals: float coordinates like the real data, and the same values are drawn and written.
    return [[round(float(x), 2), round(float(y), 2)] for x, y in points]


def _box_of(polygons: list[list[list[float]]]) -> list[float]:
    """The PhraseCut instance box: xywh over all points, with the inclusive +1 convention."""
    xs = [p[0] for polygon in polygons for p in polygon]
    ys = [p[1] for polygon in polygons for p in polygon]
    x0, y0 = min(xs), min(ys)
    return [x0, y0, round(max(xs) - x0 + 1, 2), round(max(ys) - y0 + 1, 2)]


def _boxes_overlap(a: list[float], b: list[float]) -> bool:
    m = PLACEMENT_MARGIN
    return not (
        a[0] + a[2] + m <= b[0]
        or b[0] + b[2] + m <= a[0]
        or a[1] + a[3] + m <= b[1]
        or b[1] + b[3] + m <= a[1]
    )


def _place_shape(
    rng: np.random.Generator, shape: str, colour: str, width: int, height: int, placed: list
) -> _Shape | None:
    short = min(width, height)
    extent = rng.uniform(MIN_EXTENT, MAX_EXTENT) * short
    rotation = 0.0 if shape == "circle" else rng.uniform(-20.0, 20.0)
    split = shape != "star" and rng.random() < 0.1
    while extent >= MIN_EXTENT * short:
        radius = extent / 2
        for _ in range(30):
            cx = rng.uniform(radius + 2, width - radius - 2)
            cy = rng.uniform(radius + 2, height - radius - 2)
            points = _outline(cx, cy, radius, shape, rotation)
            pieces = _split_in_two(points, cx, max(3.0, 0.08 * extent)) if split else [points]
            polygons = [_as_json_points(piece) for piece in pieces]
            box = _box_of(polygons)
            if not any(_boxes_overlap(box, other.box) for other in placed):
                relative = extent / short
                size_word = "small" if relative < SMALL_BELOW else "large" if relative > LARGE_ABOVE else None
                return _Shape(shape, colour, size_word, (cx, cy), polygons, box=box)
        extent *= 0.85
    return None


def _layout(rng: np.random.Generator, width: int, height: int) -> list[_Shape]:
    """2-4 non-overlapping shapes; sometimes a twin (same shape and colour) for a multi-instance phrase."""
    wanted = int(rng.integers(2, 5))
    while True:
        placed: list[_Shape] = []
        for _ in range(wanted):
            if placed and rng.random() < 0.3:
                shape, colour = placed[-1].shape, placed[-1].colour
            else:
                shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
            new = _place_shape(rng, shape, colour, width, height, placed)
            if new is not None:
                placed.append(new)
        if len(placed) >= 2:
            return placed


# -- pixels --------------------------------------------------------------------------------------------


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    # Greyish tones in the middle of the range, so the saturated shape colours (and white/black) stand out.
    return (rng.uniform(75, 180) + rng.uniform(-12, 12, size=3)).astype(np.float32)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # float32 and broadcasting throughout: this is most of the writer's time.
    kind = rng.integers(3)
    angle = rng.uniform(0, np.pi)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    along = (x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle)))[..., None]  # [H, W, 1]
    first, second = _muted_colour(rng), _muted_colour(rng)
    if kind == 0:  # blotchy noise: coarse noise upsampled, on a flat colour; mostly brightness, little hue
        coarse_shape = (max(2, height // 16), max(2, width // 16))
        coarse = rng.normal(0, 22, size=(*coarse_shape, 1)) + rng.normal(0, 5, size=(*coarse_shape, 3))
        coarse_image = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8))
        blotches = np.asarray(coarse_image.resize((width, height), Image.BILINEAR), dtype=np.float32)
        pixels = first + blotches - 128
    elif kind == 1:  # linear gradient between two colours
        t = (along - along.min()) / max(1e-6, float(np.ptp(along)))
        pixels = first + (second - first) * t
    else:  # stripes of two colours
        period = np.float32(rng.uniform(12, 40))
        band = np.floor(along / (period / 2)) % 2
        pixels = first + (second - first) * band
    pixels = pixels + rng.integers(-10, 11, size=(height, width, 3), dtype=np.int8)  # fine grain
    # Kept within mid tones, so that black and white shapes stay distinct from any background.
    return np.clip(pixels, 60, 195).astype(np.uint8)


STYLES = ("flat", "striped")
STRIPE_PERIOD = 10  # pixels from one dark stripe to the next in the "striped" style
STRIPE_SHADE = 0.35  # the dark stripes' brightness, as a share of the shape's colour


def _render(
    rng: np.random.Generator, width: int, height: int, shapes: list[_Shape], style: str = "flat"
) -> Image.Image:
    """The background, then each shape filled with its colour ("flat"), or with stripes of its colour and a
    dark shade of it ("striped": an appearance the demo's small CLIP never saw in pre-training). The same
    pixels belong to each shape in both styles."""
    image = Image.fromarray(_background(rng, width, height))
    for shape in shapes:
        colour = COLOURS[shape.colour]
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        for polygon in shape.polygons:
            # The official rasteriser's convention (int() vertices, outline included), so the drawn
            # pixels are exactly the mask that polygons_to_mask gives for these polygons.
            draw.polygon([(int(x), int(y)) for x, y in polygon], fill=255, outline=255)
        image.paste(_fill(shape, colour, width, height, style), mask=mask)
    return image


def _fill(shape: _Shape, colour: tuple[int, int, int], width: int, height: int, style: str) -> Image.Image:
    """The shape's paint over the whole image (the mask keeps its pixels): flat, or diagonal stripes whose
    angle follows from the shape's position (no random draw: both styles lay out the same shapes)."""
    if style == "flat":
        return Image.new("RGB", (width, height), colour)
    angle = np.deg2rad((shape.centre[0] * 7 + shape.centre[1] * 13) % 180)
    rows, cols = np.mgrid[0:height, 0:width]
    phase = (cols * np.cos(angle) + rows * np.sin(angle)) % STRIPE_PERIOD
    shade = np.where(phase < STRIPE_PERIOD / 2, 1.0, STRIPE_SHADE)[..., None]
    return Image.fromarray((np.asarray(colour, dtype=np.float64) * shade).round().astype(np.uint8))


def single_object_images(count: int, seed: int = 0, size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """`count` images of one shape each on the writer's backgrounds, captioned "<colour> <shape>" (pairs for
    pre-training a small CLIP on the same visual world as the synthetic dataset)."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(count):
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        radius = size * rng.uniform(0.2, 0.42)
        cx, cy = size * (0.5 + rng.uniform(-0.12, 0.12)), size * (0.5 + rng.uniform(-0.12, 0.12))
        points = _outline(cx, cy, radius, shape, rng.uniform(0, 360))
        image = Image.fromarray(_background(rng, size, size))
        ImageDraw.Draw(image).polygon([(float(x), float(y)) for x, y in points], fill=COLOURS[colour])
        images.append(image)
        captions.append(f"{colour} {shape}")
    return images, captions


# -- phrases -------------------------------------------------------------------------------------------


def _relation_holds(subject: _Shape, other: _Shape, predicate: str) -> bool:
    """Positions by centres, along the dominant axis: "left of" means mostly to the left."""
    dx, dy = other.centre[0] - subject.centre[0], other.centre[1] - subject.centre[1]
    horizontal = abs(dx) > abs(dy)
    return {
        "left of": horizontal and dx > 0,
        "right of": horizontal and dx < 0,
        "above": not horizontal and dy > 0,
        "below": not horizontal and dy < 0,
    }[predicate]


def _matches(shape: _Shape, name: str, attributes: list[str]) -> bool:
    return shape.shape == name and all(a in (shape.colour, shape.size_word) for a in attributes)


def _satisfies(subject: _Shape, structure: dict, shapes: list[_Shape], with_relations: bool = True) -> bool:
    if not _matches(subject, structure["name"], structure["attributes"]):
        return False
    if not with_relations:
        return True
    for predicate, supporting in structure["relation_descriptions"]:
        *attributes, name = supporting.split()
        if not any(
            other is not subject
            and _matches(other, name, attributes)
            and _relation_holds(subject, other, predicate)
            for other in shapes
        ):
            return False
    return True


def _phrase_type(structure: dict, shapes: list[_Shape], target: set[int]) -> str:
    """The least cue that singles out the target: the name alone, name + attributes, or the relation too."""
    by_name = {i for i, s in enumerate(shapes) if _matches(s, structure["name"], [])}
    if by_name == target:
        return "name"
    by_attributes = {
        i for i, s in enumerate(shapes) if _satisfies(s, structure, shapes, with_relations=False)
    }
    return "attribute" if by_attributes == target else "relation"


def _relation_to(rng: np.random.Generator, subject: _Shape, shapes: list[_Shape]) -> list[str] | None:
    """A [predicate, supporting object] that holds for `subject`, or None."""
    options = [
        (predicate, other)
        for other in shapes
        if other is not subject and (other.shape, other.colour) != (subject.shape, subject.colour)
        for predicate in PREDICATES
        if _relation_holds(subject, other, predicate)
    ]
    if not options:
        return None
    predicate, other = options[int(rng.integers(len(options)))]
    supporting = f"{other.colour} {other.shape}" if rng.random() < 0.3 else other.shape
    return [predicate, supporting]


def _candidate_structures(rng: np.random.Generator, shapes: list[_Shape]) -> list[dict]:
    structures = []
    groups: dict[tuple[str, str], list[_Shape]] = {}
    for shape in shapes:
        groups.setdefault((shape.shape, shape.colour), []).append(shape)
    for (name, colour), members in groups.items():
        unique_by_name = sum(s.shape == name for s in shapes) == len(members)
        attributes = [] if unique_by_name and rng.random() < 0.5 else [colour]
        sizes = {s.size_word for s in members}
        if len(sizes) == 1 and None not in sizes and rng.random() < 0.4:
            attributes.append(sizes.pop())  # prepended by the phrase rule: "small red circle"
        relations = []
        if len(members) == 1 and rng.random() < 0.3:
            relation = _relation_to(rng, members[0], shapes)
            relations = [relation] if relation else []
        structures.append({"name": name, "attributes": attributes, "relation_descriptions": relations})
        if len(members) > 1:  # a relation can single out one of the twins
            for member in members:
                relation = _relation_to(rng, member, shapes)
                if relation:
                    structures.append(
                        {"name": name, "attributes": [colour], "relation_descriptions": [relation]}
                    )
    for name in sorted({s.shape for s in shapes}):
        if sum(s.shape == name for s in shapes) > 1 and rng.random() < 0.3:  # "circle": every circle
            structures.append({"name": name, "attributes": [], "relation_descriptions": []})
    return structures


def _tasks_for_image(
    rng: np.random.Generator, image_id: int, shapes: list[_Shape], ids: _IdCounter
) -> list[dict]:
    tasks, seen_targets = [], set()
    for structure in _candidate_structures(rng, shapes):
        target = frozenset(i for i, s in enumerate(shapes) if _satisfies(s, structure, shapes))
        if not target or target in seen_targets:  # one task per region, as task ids are unique
            continue
        seen_targets.add(target)
        members = [shapes[i] for i in sorted(target)]
        ann_ids = [s.ann_id for s in members]
        phrase_structure = {
            "name": structure["name"],
            "attributes": structure["attributes"],
            "relation_ids": [ids.next_relation() for _ in structure["relation_descriptions"]],
            "relation_descriptions": structure["relation_descriptions"],
            "type": _phrase_type(structure, shapes, set(target)),
        }
        tasks.append(
            {
                "task_id": f"{image_id}__{'_'.join(map(str, ann_ids))}",
                "image_id": image_id,
                "ann_ids": ann_ids,
                "Polygons": [s.polygons for s in members],
                "instance_boxes": [s.box for s in members],
                "phrase": construct_phrase(phrase_structure),
                "phrase_structure": phrase_structure,
            }
        )
    return tasks


# -- files ---------------------------------------------------------------------------------------------


class _IdCounter:
    """Visual-Genome-looking ids, increasing with random gaps (image ids in VG's 2.3M+ range)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.image = 2_340_000 + int(rng.integers(0, 20_000))
        self.object = 1_050_000 + int(rng.integers(0, 100_000))
        self.relation = 3_700_000 + int(rng.integers(0, 100_000))

    def _step(self, attribute: str, gap: int) -> int:
        value = getattr(self, attribute) + int(self.rng.integers(1, gap))
        setattr(self, attribute, value)
        return value

    def next_image(self) -> int:
        return self._step("image", 40)

    def next_object(self) -> int:
        return self._step("object", 12)

    def next_relation(self) -> int:
        return self._step("relation", 12)


def _image_entry(rng: np.random.Generator, image_id: int, width: int, height: int, split: str) -> dict:
    return {
        "image_id": image_id,
        "url": f"https://cs.stanford.edu/people/rak248/VG_100K_2/{image_id}.jpg",
        "width": width,
        "height": height,
        "coco_id": int(rng.integers(1, 581_930)) if rng.random() < 0.15 else None,
        "flickr_id": int(rng.integers(2_000_000_000, 9_000_000_000)) if rng.random() < 0.7 else None,
        "split": split,
    }


def _normalise_counts(num_images: Mapping[str, int]) -> dict[str, int]:
    counts = dict.fromkeys(FILE_SPLITS, 0)
    for split, count in num_images.items():
        split = "val" if split == "validation" else split
        if split not in counts:
            raise ValueError(f"unknown split {split!r} in num_images; use {', '.join(FILE_SPLITS)}.")
        if int(count) < 0:
            raise ValueError(f"num_images[{split!r}] must be >= 0, got {count}.")
        counts[split] = int(count)
    return counts


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def write_synthetic_phrasecut(
    output_dir: str | Path,
    num_images: Mapping[str, int],
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 320,
    overwrite: bool = False,
    style: str = "flat",
) -> Path:
    """Write a synthetic PhraseCut folder (refer_*.json, image_data_split.json, name_att_rel_count.json, images/).

    `num_images` maps split -> number of images with tasks ("train", "val" or "validation", "test",
    "miniv"; missing splits get none, and an empty refer file). As in the real data, a few extra
    train images appear in image_data_split.json without tasks. Image sides are drawn from
    [min_size, max_size]. Deterministic: the same arguments give byte-identical files. `style` "striped" paints
    the shapes in stripes (the same layouts, phrases and masks as "flat"): a shift in appearance.
    The folder is written under a temporary name and renamed when complete.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}.")
    counts = _normalise_counts(num_images)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty; choose another --output_dir or pass --overwrite_output_dir."
        )
    with atomic_folder(output_dir) as staging:
        _write_splits(staging, counts, seed, min_size, max_size, style)
    return output_dir


def _write_splits(
    folder: Path, counts: dict[str, int], seed: int, min_size: int, max_size: int, style: str = "flat"
) -> None:
    (folder / "images").mkdir()
    rng = np.random.default_rng(seed)
    ids = _IdCounter(rng)
    metadata, vocabulary_counts = [], {"cat": Counter(), "att": Counter(), "rel": Counter()}

    for split_index, split in enumerate(FILE_SPLITS):
        tasks = []
        without_tasks = max(1, counts[split] // 50) if split == "train" and counts[split] else 0
        for index in range(counts[split] + without_tasks):
            # Each image has its own generator, so an image does not depend on the ones before it.
            image_rng = np.random.default_rng([seed, split_index, index])
            image_id = ids.next_image()
            width, height = (int(v) for v in image_rng.integers(min_size, max_size + 1, size=2))
            shapes = _layout(image_rng, width, height)
            for shape in shapes:
                shape.ann_id = ids.next_object()
            # No chroma subsampling: colour edges stay where the polygons are (IoU >= 0.95 after JPEG).
            _render(image_rng, width, height, shapes, style).save(
                folder / "images" / f"{image_id}.jpg", quality=90, subsampling=0
            )
            metadata.append(_image_entry(image_rng, image_id, width, height, split))
            if index < counts[split]:
                tasks.extend(_tasks_for_image(image_rng, image_id, shapes, ids))
        _write_json(folder / f"refer_{split}.json", tasks)
        for task in tasks:
            structure = task["phrase_structure"]
            vocabulary_counts["cat"][structure["name"]] += 1
            vocabulary_counts["att"].update(structure["attributes"])
            vocabulary_counts["rel"].update(predicate for predicate, _ in structure["relation_descriptions"])

    _write_json(folder / "image_data_split.json", metadata)
    _write_json(
        folder / "name_att_rel_count.json",
        {
            kind: sorted(([w, n] for w, n in counter.items()), key=lambda p: (-p[1], p[0]))
            for kind, counter in vocabulary_counts.items()
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Write a synthetic PhraseCut dataset in the real on-disk layout.")
    parser.add_argument("--output_dir", required=True, help="folder to create (refer_*.json, images/, ...)")
    parser.add_argument("--num_train", type=int, default=200, help="training images with phrases")
    parser.add_argument("--num_val", type=int, default=40, help="validation images")
    parser.add_argument("--num_test", type=int, default=40, help="test images")
    parser.add_argument("--num_miniv", type=int, default=10, help="miniv images (a small validation split)")
    parser.add_argument(
        "--seed", type=int, default=0, help="the same seed and arguments write the same files"
    )
    parser.add_argument("--min_size", type=int, default=160, help="smallest image side, in pixels")
    parser.add_argument("--max_size", type=int, default=320, help="largest image side, in pixels")
    parser.add_argument(
        "--style",
        choices=STYLES,
        default="flat",
        help="striped: shapes painted in stripes (same layouts and masks), a shift in appearance",
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace a non-empty --output_dir"
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        path = write_synthetic_phrasecut(
            args.output_dir,
            {"train": args.num_train, "val": args.num_val, "test": args.num_test, "miniv": args.num_miniv},
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            overwrite=args.overwrite_output_dir,
            style=args.style,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    with_phrases = sum((args.num_train, args.num_val, args.num_test, args.num_miniv))
    without = len(list((path / "images").glob("*.jpg"))) - with_phrases
    logger.info(
        f"wrote a synthetic PhraseCut with {plural(with_phrases, 'image')} with phrases and {without} train images "
        f"without any (as in the real data) to {path}"
    )


if __name__ == "__main__":
    run_command(main)
