"""PhraseCut's official evaluation subsets: which of them each task belongs to.

The definitions follow PhraseCutDataset `utils/subset.py::get_subset` (the benchmark's own code);
the word lists below are the benchmark's (facts, reproduced so results stay comparable).
Inputs per task: its phrase structure, its number of instances, the relative size of its polygon
mask at native resolution (pixels / (width * height)), the image's `coco_id`, and the frequency
ranks read from `name_att_rel_count.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

# Every subset the official evaluator reports, in its order. A task's `subsets` list keeps this order.
OFFICIAL_SUBSETS = (
    "all", "c_coco",
    "c20", "c100", "c500", "c21-100", "c101-500", "c500+",
    "i_single", "i_multi", "i_many",
    "p_name", "p_att", "p_att+", "p_rel", "p_rel+", "p_verbose", "p_attm", "p_relm",
    "t_stuff", "t_obj",
    "s_small", "s_mid", "s_large",
    "a20", "a100", "a200", "a21-100", "a101-200", "a200+",
    "a_color", "a_shape", "a_material", "a_texture", "a_state", "a_adj", "a_noun", "a_loc", "a_count", "a_bad",
    "p_att_rel",
    "d_cocotv", "d_notcocotv",
)  # fmt: skip

# Subsets that need name_att_rel_count.json; without it they are left out of every task.
RANK_SUBSETS = frozenset({"c20", "c100", "c500", "c21-100", "c101-500", "c500+"}) | frozenset(
    {"a20", "a100", "a200", "a21-100", "a101-200", "a200+"}
)

# Ranks given to a name or attribute missing from the frequency lists (and to "no attribute").
UNRANKED_CATEGORY = 501
UNRANKED_ATTRIBUTE = 201

COCO_CATEGORY_NAMES = frozenset({
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
})  # fmt: skip

# A task is "stuff" when any of these is a substring of its category name ("street" matches "tree").
STUFF_NAMES = (
    "water", "waterdrops", "sea", "river", "fog", "ground", "field", "platform", "rail", "pavement", "road",
    "gravel", "mud", "dirt", "snow", "sand", "solid", "hill", "mountain", "stone", "rock", "wood", "sky",
    "cloud", "vegetation", "straw", "moss", "branch", "leaf", "leaves", "bush", "tree", "grass", "forest",
    "railing", "net", "cage", "fence", "building", "roof", "tent", "bridge", "skyscraper", "house", "food",
    "vegetable", "salad", "textile", "banner", "blanket", "curtain", "cloth", "napkin", "towel", "mat", "rug",
    "stairs", "light", "counter", "mirror", "cupboard", "cabinet", "shelf", "table", "desk", "door", "window",
    "floor", "carpet", "ceiling", "wall", "brick", "metal", "plastic", "paper", "cardboard", "street",
    "shadow", "sidewalk", "plant", "wave", "reflection", "ocean", "beach",
)  # fmt: skip

# Attribute types: a task is in "a_<type>" when any of its attributes is in that type's list.
ATTRIBUTE_TYPES = {
    "a_color": frozenset({
        "white", "black", "blue", "green", "brown", "red", "yellow", "gray", "grey", "silver", "orange",
        "dark", "pink", "tan", "purple", "beige", "bright", "gold", "colorful", "blonde", "light brown",
        "light blue", "colored", "multicolored", "maroon", "dark blue", "dark brown", "golden", "dark green",
        "black and white", "blond", "evergreen", "light colored", "dark grey", "multi-colored",
        "light skinned", "dark colored", "multi colored", "blue and white", "light green", "bright blue",
        "red and white", "dark gray", "cream colored", "light grey", "teal", "navy blue", "turquoise",
        "murky", "navy",
    }),
    "a_shape": frozenset({
        "large", "small", "tall", "long", "big", "short", "round", "grassy", "little", "thick", "square",
        "thin", "sliced", "curved", "rectangular", "flat", "high", "wide", "stacked", "arched", "chain link",
        "circular", "bent", "cut", "huge", "metallic", "cream", "pointy", "extended", "curly", "skinny",
        "pointed", "narrow", "piled", "tiny", "vertical", "oval", "curled", "row", "straight", "smaller",
        "triangular", "horizontal", "crossed", "sharp", "upside down", "pointing", "chopped", "slice",
        "rectangle", "shallow", "wispy", "rounded", "piece", "scattered", "giant", "slanted", "tied",
        "sparse", "circle", "patchy", "tilted", "fat", "upright", "larger",
    }),
    "a_material": frozenset({
        "wooden", "metal", "wood", "brick", "cloudy", "glass", "concrete", "plastic", "stone", "tiled",
        "cement", "dirt", "sandy", "leafy", "fluffy", "rocky", "snowy", "leather", "steel", "paper",
        "chocolate", "tile", "ceramic", "grass", "furry", "iron", "water", "stainless steel", "hardwood",
        "marble", "khaki", "cardboard", "porcelain", "snow covered", "asphalt", "chrome", "rock", "wicker",
        "rubber", "denim", "muddy", "foamy", "granite", "bricked", "gravel", "snow-covered", "clay", "sand",
        "red brick",
    }),
    "a_texture": frozenset({
        "clear", "wet", "striped", "dirty", "paved", "shiny", "painted", "dry", "plaid", "clean", "blurry",
        "hazy", "floral", "rusty", "splashing", "cloudless", "worn", "smooth", "checkered", "spotted",
        "patterned", "reflecting", "wrinkled", "reflective", "shining", "choppy", "rough", "reflected",
        "rusted", "lined", "fuzzy", "blurred", "faded", "printed", "foggy", "dusty", "glazed", "rippled",
        "transparent", "frosted",
    }),
    "a_state": frozenset({
        "standing", "open", "sitting", "walking", "parked", "hanging", "playing", "closed", "empty", "on",
        "looking", "watching", "flying", "eating", "skiing", "covered", "surfing", "skateboarding", "full",
        "jumping", "holding", "close", "leaning", "running", "riding", "folded", "waiting", "moving",
        "laying", "grazing", "off", "talking", "parking", "calm", "posing", "crashing", "melted", "skating",
        "seated", "raised", "playing tennis", "sleeping", "opened", "broken", "resting", "dried",
        "snowboarding", "crouching", "driving", "fried", "swinging", "cracked", "drinking", "burnt",
        "kneeling", "stopped", "rolling", "sitting down", "trimmed", "breaking", "crouched", "bending",
        "dressed", "standing up", "wrapped", "attached", "floating", "rolled up", "lying", "squatting",
        "held", "cutting", "outstretched", "illuminated", "reading", "turned", "swimming", "turning",
    }),
    "a_adj": frozenset({
        "young", "old", "smiling", "bare", "light", "part", "dead", "cooked", "framed", "pictured",
        "overcast", "leafless", "beautiful", "stuffed", "growing", "decorative", "electrical", "electric",
        "bald", "older", "lit", "fresh", "lush", "wire", "happy", "puffy", "sunny", "ripe", "male", "palm",
        "shirtless", "female", "asian", "hairy", "ornate", "bushy", "deep", "wavy", "toasted", "barefoot",
        "potted", "short sleeved", "edge", "wild", "busy", "decorated", "double decker", "long sleeved",
        "partial", "soft", "flat screen", "healthy", "floppy", "plain", "filled", "modern", "long sleeve",
        "overgrown", "displayed", "digital", "cast", "airborne", "delicious", "hard", "carpeted", "heavy",
        "new", "grilled", "sleeveless", "pale", "pretty", "different", "american", "nice", "fake",
        "designed", "cute", "manicured", "written",
    }),
    "a_noun": frozenset({
        "tennis", "baseball", "man's", "baby", "train", "woman's", "pine", "tree", "street", "passenger",
        "traffic", "computer", "adult", "ski", "man", "wine", "burgundy", "stop", "snow", "bathroom", "city",
        "teddy", "kitchen", "patch", "nike", "woman", "wall", "fire", "clock", "window", "straw", "flower",
        "ground", "pizza", "apple", "power", "coffee", "tennis player", "toy", "ocean",
    }),
    "a_loc": frozenset({
        "distant", "background", "back", "behind", "in background", "side", "up", "rear", "down", "top",
        "far", "overhead", "low", "above", "outdoors", "in distance", "in the background", "inside",
        "outdoor", "bottom", "in air",
    }),
    "a_count": frozenset({
        "one", "three", "four", "many", "pair", "several", "double", "grouped", "group", "together", "bunch",
        "alone", "set", "single",
    }),
    "a_bad": frozenset({
        "here", "present", "wearing", "in the picture", "some", "daytime", "existing", "ready", "made",
        "in picture",
    }),
}  # fmt: skip


class FrequencyRanks(NamedTuple):
    """0-based frequency ranks (most frequent first) of category names and attributes."""

    categories: dict[str, int]
    attributes: dict[str, int]


def read_frequency_ranks(path: str | Path) -> FrequencyRanks:
    """Read `name_att_rel_count.json`: {"cat": [[name, count], ...], "att": [...], "rel": [...]}, sorted by count."""
    with open(path, encoding="utf-8") as f:
        counts = json.load(f)

    def ranks(pairs: list) -> dict[str, int]:
        order: dict[str, int] = {}
        for rank, (word, _count) in enumerate(pairs):
            order.setdefault(word, rank)  # the official code takes list.index(): the first occurrence
        return order

    return FrequencyRanks(categories=ranks(counts["cat"]), attributes=ranks(counts["att"]))


def _rank_buckets(prefix: str, rank: int, edges: tuple[int, int, int]) -> list[str]:
    """The official c*/a* buckets: cumulative top-k sets plus exclusive ranges, e.g. c20, c21-100, c100."""
    low, mid, high = edges
    names = []
    if rank < low:
        names.append(f"{prefix}{low}")
    elif rank < mid:
        names.append(f"{prefix}{low + 1}-{mid}")
    elif rank < high:
        names.append(f"{prefix}{mid + 1}-{high}")
    else:
        names.append(f"{prefix}{high}+")
    if rank < mid:
        names.append(f"{prefix}{mid}")
    if rank < high:
        names.append(f"{prefix}{high}")
    return names


def task_subsets(
    phrase_structure: Mapping,
    num_instances: int,
    relative_size: float,
    coco_id: int | None,
    ranks: FrequencyRanks | None,
) -> list[str]:
    """Names of the official subsets a task belongs to, in `OFFICIAL_SUBSETS` order.

    `relative_size` is the task's polygon-mask pixel count at native resolution / (width * height).
    Without `ranks` (no name_att_rel_count.json) the frequency-rank subsets (c20..., a20...) are omitted.
    """
    name = phrase_structure["name"]
    attributes = phrase_structure["attributes"]
    relations = phrase_structure["relation_descriptions"]
    phrase_type = phrase_structure["type"]
    member = {"all"}

    member.add("d_cocotv" if coco_id else "d_notcocotv")  # the official test is truthiness
    if name in COCO_CATEGORY_NAMES:
        member.add("c_coco")

    if ranks is not None:
        category_rank = ranks.categories.get(name, UNRANKED_CATEGORY)
        member.update(_rank_buckets("c", category_rank, (20, 100, 500)))
        attribute_rank = min(
            (ranks.attributes[a] for a in attributes if a in ranks.attributes), default=UNRANKED_ATTRIBUTE
        )
        member.update(_rank_buckets("a", min(attribute_rank, UNRANKED_ATTRIBUTE), (20, 100, 200)))

    if attributes:
        member.add("p_att")
    if len(attributes) > 1:
        member.add("p_attm")
    if relations:
        member.add("p_rel")
    if len(relations) > 1:
        member.add("p_relm")
    if attributes and relations:
        member.add("p_att_rel")
    type_subset = {"name": "p_name", "attribute": "p_att+", "relation": "p_rel+", "verbose": "p_verbose"}
    if phrase_type in type_subset:
        member.add(type_subset[phrase_type])

    if num_instances == 1:
        member.add("i_single")
    elif 1 < num_instances < 5:
        member.add("i_multi")
    elif num_instances >= 5:
        member.add("i_many")

    if relative_size < 0.02:
        member.add("s_small")
    elif relative_size > 0.2:
        member.add("s_large")
    else:
        member.add("s_mid")

    member.add("t_stuff" if any(stuff in name for stuff in STUFF_NAMES) else "t_obj")

    for subset, words in ATTRIBUTE_TYPES.items():
        if any(a in words for a in attributes):
            member.add(subset)

    return [s for s in OFFICIAL_SUBSETS if s in member]
