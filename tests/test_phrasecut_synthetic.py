"""The synthetic writer: the real layout and schema, determinism, and polygons that match the pixels."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phrasecut_dataset import (
    construct_phrase,
    polygons_to_mask,
    synthetic_vocabulary,
    write_synthetic_phrasecut,
)
from phrasecut_dataset.synthetic import main as synthetic_main

TASK_KEYS = {"task_id", "image_id", "ann_ids", "Polygons", "instance_boxes", "phrase", "phrase_structure"}
STRUCTURE_KEYS = {"name", "attributes", "relation_ids", "relation_descriptions", "type"}
IMAGE_KEYS = {"image_id", "url", "width", "height", "coco_id", "flickr_id", "split"}
COUNTS = {"train": 30, "val": 4, "test": 4, "miniv": 2}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_synthetic_phrasecut(tmp_path_factory.mktemp("s") / "raw", COUNTS, seed=0)


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def all_tasks(raw):
    return [t for split in COUNTS for t in load(raw / f"refer_{split}.json")]


def test_layout_and_schema_are_the_real_ones(raw):
    assert {p.name for p in raw.iterdir()} == {
        "refer_train.json", "refer_val.json", "refer_test.json", "refer_miniv.json",
        "image_data_split.json", "name_att_rel_count.json", "images",
    }  # fmt: skip
    metadata = load(raw / "image_data_split.json")
    assert all(set(entry) == IMAGE_KEYS for entry in metadata)
    by_id = {entry["image_id"]: entry for entry in metadata}
    for split, count in COUNTS.items():
        tasks = load(raw / f"refer_{split}.json")
        assert isinstance(tasks, list)
        assert len({t["image_id"] for t in tasks}) == count
        assert {by_id[t["image_id"]]["split"] for t in tasks} == {split}
    # As in the real data, a train image can be listed without any tasks.
    with_tasks = {t["image_id"] for t in all_tasks(raw)}
    assert [e["split"] for e in metadata if e["image_id"] not in with_tasks] == ["train"]
    for entry in metadata:
        with Image.open(raw / "images" / f"{entry['image_id']}.jpg") as image:
            assert image.format == "JPEG" and image.size == (entry["width"], entry["height"])
            assert 160 <= min(image.size) and max(image.size) <= 320
    counts = load(raw / "name_att_rel_count.json")
    assert set(counts) == {"cat", "att", "rel"}
    for pairs in counts.values():
        assert [n for _, n in pairs] == sorted((n for _, n in pairs), reverse=True)


def test_tasks_have_the_exact_keys_and_consistent_values(raw):
    tasks = all_tasks(raw)
    assert len({t["task_id"] for t in tasks}) == len(tasks)
    vocabulary = set(synthetic_vocabulary())
    for task in tasks:
        assert set(task) == TASK_KEYS and set(task["phrase_structure"]) == STRUCTURE_KEYS
        structure = task["phrase_structure"]
        assert task["phrase"] == construct_phrase(structure)
        assert set(task["phrase"].split()) <= vocabulary
        assert task["task_id"] == f"{task['image_id']}__{'_'.join(map(str, task['ann_ids']))}"
        assert len(task["ann_ids"]) == len(task["Polygons"]) == len(task["instance_boxes"])
        assert len(structure["relation_ids"]) == len(structure["relation_descriptions"])
        assert structure["type"] in {"name", "attribute", "relation"}
        for instance, box in zip(task["Polygons"], task["instance_boxes"]):
            points = np.asarray([p for polygon in instance for p in polygon])
            assert all(len(polygon) >= 3 and polygon[0] != polygon[-1] for polygon in instance)  # not closed
            x0, y0 = points.min(axis=0)
            x1, y1 = points.max(axis=0)
            np.testing.assert_allclose(box, [x0, y0, x1 - x0 + 1, y1 - y0 + 1], atol=0.011)  # +1 convention


def test_the_variety_a_test_needs_is_there(raw):
    tasks = all_tasks(raw)
    assert any(len(t["Polygons"]) > 1 for t in tasks)  # multi-instance phrases
    assert any(len(instance) > 1 for t in tasks for instance in t["Polygons"])  # instance in two polygons
    assert {t["phrase_structure"]["type"] for t in tasks} == {"name", "attribute", "relation"}
    assert any(x != int(x) for t in tasks for p in t["Polygons"][0][0] for x in p)  # float coordinates
    assert {t["phrase_structure"]["name"] for t in tasks} >= {"circle", "square", "triangle"}
    per_image = np.bincount(np.unique([t["image_id"] for t in tasks], return_counts=True)[1])
    assert per_image[:2].sum() < per_image.sum()  # most images have several phrases


def test_object_sizes_are_learnable(raw):
    metadata = {e["image_id"]: e for e in load(raw / "image_data_split.json")}
    for task in all_tasks(raw):
        image = metadata[task["image_id"]]
        short = min(image["width"], image["height"])
        for _, _, w, h in task["instance_boxes"]:
            # Boxes of shapes 20%-45% of the short side across (a box can be a little narrower).
            assert 0.13 * short <= max(w, h) - 1 <= 0.46 * short


def test_polygons_match_the_drawn_pixels(raw):
    for task in load(raw / "refer_train.json"):
        with Image.open(raw / "images" / f"{task['image_id']}.jpg") as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        height, width = pixels.shape[:2]
        for instance in task["Polygons"]:
            mask = polygons_to_mask([instance], height, width)
            ys, xs = np.nonzero(mask)
            window = (slice(max(0, ys.min() - 3), ys.max() + 4), slice(max(0, xs.min() - 3), xs.max() + 4))
            colour = np.median(pixels[window][mask[window]], axis=0)
            drawn = np.linalg.norm(pixels[window] - colour, axis=-1) < 60  # JPEG blurs the edges a little
            iou = (drawn & mask[window]).sum() / (drawn | mask[window]).sum()
            assert iou > 0.9, (task["task_id"], iou)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, raw):
    again = write_synthetic_phrasecut(tmp_path / "again", COUNTS, seed=0)
    files = sorted(p.relative_to(raw) for p in raw.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((raw / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = write_synthetic_phrasecut(tmp_path / "other", COUNTS, seed=1)
    assert (other / "refer_train.json").read_bytes() != (raw / "refer_train.json").read_bytes()


def test_construct_phrase_follows_the_phrasecut_rule():
    def phrase(name, attributes=(), relations=()):
        return construct_phrase(
            {"name": name, "attributes": list(attributes), "relation_descriptions": relations}
        )

    assert phrase("circle", ["red", "small"]) == "small red circle"
    assert phrase("square", ["blue"], [["left of", "triangle"]]) == "blue square left of triangle"
    assert phrase("man", ["standing up"]) == "man standing up"
    assert phrase("cat", ["in the background", "black"]) == "black cat in the background"
    assert phrase("room", ["living room"]) == "living room room"  # "living" is the listed exception
    assert phrase("sky", ["  blue "]) == "blue sky"


def test_vocabulary_is_sorted_words():
    vocabulary = synthetic_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    assert set("circle square triangle red green blue yellow small left of".split()) <= set(vocabulary)
    assert all(" " not in word for word in vocabulary)


def test_command_line_and_its_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = f"--output_dir {out} --num_train 2 --num_val 1 --num_test 1 --num_miniv 0".split()
    synthetic_main([*args, "--seed", "5", "--min_size", "64", "--max_size", "80"])
    # 2 train images give one more without phrases: the message counts every image written
    assert "with 4 images with phrases and 1 train images without any" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.jpg"))) == 5
    assert len(load(out / "refer_miniv.json")) == 0
    with pytest.raises(SystemExit):
        synthetic_main(args)  # the folder exists and is not empty
    assert "--overwrite_output_dir" in capsys.readouterr().err
    synthetic_main([*args, "--overwrite_output_dir"])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        write_synthetic_phrasecut(tmp_path / "x", {"dev": 1})
    assert not (tmp_path / "x").exists()
