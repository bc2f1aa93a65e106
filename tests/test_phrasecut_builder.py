"""The builder over the real layout: the hand-made fixture (values checked by hand) and synthetic data."""

import json
import logging
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

from clipseg_tools.batching import row_masks
from clipseg_tools.transforms import decode_image
from phrasecut_dataset import (
    FEATURES,
    KNOWN_BAD_IMAGE_IDS,
    PhraseCut,
    load_phrasecut,
    polygons_to_mask,
    prepare_phrasecut,
    write_synthetic_phrasecut,
)
from phrasecut_dataset import builder as builder_module

TINY = Path(__file__).parent / "fixtures" / "phrasecut_tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    builder = prepare_phrasecut(TINY, cache_dir=cache)
    return builder, builder.as_dataset()


def test_splits_and_one_row_per_image(tiny):
    _, dataset = tiny
    assert list(dataset) == ["train", "validation", "test", "miniv"]
    assert [len(dataset[s]) for s in dataset] == [1, 1, 1, 1]
    assert dataset["train"].features == FEATURES


def test_row_fields_and_task_order(tiny):
    _, dataset = tiny
    row = dataset["train"][0]
    assert (row["image_id"], row["width"], row["height"], row["coco_id"]) == (2417001, 10, 8, None)
    assert row["image"].size == (10, 8)
    # Tasks keep the file's order; the known bad image's task in between is gone with its image.
    assert [t["task_id"] for t in row["tasks"]] == ["2417001__1058001", "2417001__1058002_1058003"]
    relation = row["tasks"][1]
    assert relation["phrase"] == "brûlée crêpe on table"
    assert relation["phrase_structure"] == {
        "name": "crêpe",
        "attributes": ["brûlée"],
        "relation_ids": [3923001],
        "relation_descriptions": [{"predicate": "on", "object": "table"}],
        "type": "relation",
    }
    assert relation["ann_ids"] == [1058002, 1058003]
    # Two instances, the first drawn as two polygons; coordinates as the JSON has them, not closed.
    polygons = relation["polygons"]
    assert [len(instance) for instance in polygons] == [2, 1]
    np.testing.assert_allclose(polygons[0][0], [[0.0, 0.0], [3.9, 0.2], [0.4, 3.7]], rtol=1e-6)
    np.testing.assert_allclose(
        relation["instance_boxes"], [[0.0, 0.0, 6.8, 4.7], [7.2, 5.2, 3.79, 3.7]], rtol=1e-6
    )
    assert dataset["validation"][0]["coco_id"] == 98765


def test_the_jpeg_bytes_are_embedded_unchanged(tiny):
    _, dataset = tiny
    cell = dataset["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert cell == {"bytes": (TINY / "images" / "2417001.jpg").read_bytes(), "path": "2417001.jpg"}


def test_masks_match_the_hand_counted_pixels(tiny):
    _, dataset = tiny
    row = dataset["train"][0]
    masks = row_masks(row)
    assert masks.shape == (2, 8, 10)
    assert masks.sum(axis=(1, 2)).tolist() == [30, 26]  # see test_phrasecut_masks for the counts
    val = dataset["validation"][0]
    assert row_masks(val).sum(axis=(1, 2)).tolist() == [64, 6]
    assert row_masks(dataset["test"][0]).sum() == 5 * 4  # five 2x2 instances
    assert row_masks(dataset["miniv"][0]).all()  # vertices at -0.5 truncate to 0: the whole image


def test_vertices_keep_the_jsons_value_so_masks_truncate_as_the_official_rasteriser_does(tmp_path):
    """PhraseCut's own k/600*width coordinates give vertices just below an integer: stored as float32 they
    would round up to it, and int() would then draw them a pixel further than the official rasteriser."""
    data = tmp_path / "data"
    shutil.copytree(TINY, data)
    refer = json.loads((data / "refer_train.json").read_text())
    below_four = 3.9999999999999996
    assert int(below_four) == 3 and int(np.float32(below_four)) == 4
    refer[0]["Polygons"] = [[[[0.0, 0.0], [below_four, 0.0], [below_four, 5.0], [0.0, 5.0]]]]
    (data / "refer_train.json").write_text(json.dumps(refer))
    row = load_phrasecut(data, cache_dir=tmp_path / "cache", splits=["train"])["train"][0]
    assert row["tasks"][0]["polygons"][0][0][1][0] == below_four
    official = polygons_to_mask(refer[0]["Polygons"], row["height"], row["width"])
    assert official.sum() == 4 * 6  # columns 0..3, rows 0..5
    np.testing.assert_array_equal(row_masks(row)[0], official)


def test_subsets_computed_by_hand(tiny):
    _, dataset = tiny
    sign, crepe = dataset["train"][0]["tasks"]
    assert sign["subsets"] == [
        "all", "c20", "c100", "c500", "i_single", "p_att", "p_att+", "t_obj", "s_large",
        "a20", "a100", "a200", "a_color", "d_notcocotv",
    ]  # fmt: skip
    assert crepe["subsets"] == [
        "all", "c500+", "i_multi", "p_att", "p_rel", "p_rel+", "t_obj", "s_large", "a200+", "p_att_rel", "d_notcocotv",
    ]  # fmt: skip
    person, man = dataset["validation"][0]["tasks"]
    assert {"c_coco", "d_cocotv", "s_large", "p_name"} <= set(person["subsets"])
    assert man["phrase"] == "man standing up"
    assert {"p_verbose", "a_state", "s_mid"} <= set(man["subsets"])  # 6 px of 16x12 = 0.031
    assert {"i_many", "t_stuff", "s_mid"} <= set(dataset["test"][0]["tasks"][0]["subsets"])
    palm = dataset["miniv"][0]["tasks"][0]
    assert {"c21-100", "c100", "t_stuff", "s_large"} <= set(palm["subsets"])


def test_known_bad_images_are_left_out_and_counted(tiny, caplog):
    builder, _ = tiny
    assert 150417 in KNOWN_BAD_IMAGE_IDS and len(KNOWN_BAD_IMAGE_IDS) == 17
    report = builder.skip_report
    assert report["train"] == {
        "images_kept": 1,
        "tasks_kept": 2,
        "known_bad_images_skipped": 1,
        "images_skipped": {},
        "tasks_skipped": {},
    }
    # A second load finds the cache, and repeats the summary from the saved report.
    with caplog.at_level(logging.INFO, logger="phrasecut_dataset.builder"):
        again = prepare_phrasecut(TINY, cache_dir=Path(builder.cache_dir).parents[3])
    assert again.skip_report == report
    assert "PhraseCut train: kept 1 images / 2 tasks; skipped 1 known bad images" in caplog.text


def test_prepared_data_survives_deleting_the_raw_folder(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(TINY, raw)
    cache = tmp_path / "cache"
    first = load_phrasecut(raw, cache_dir=cache, splits=["train"])
    expected = np.asarray(first["train"][0]["image"])
    shutil.rmtree(raw)
    again = load_phrasecut(raw, cache_dir=cache, splits=["train"])
    image = again["train"][0]["image"]
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert (
        again["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]["path"] == "2417001.jpg"
    )


def test_only_the_requested_splits_are_prepared(tmp_path):
    dataset = load_phrasecut(TINY, cache_dir=tmp_path, splits=["val", "miniv"])
    assert list(dataset) == ["validation", "miniv"]


def test_the_cache_is_keyed_on_the_code(tmp_path, monkeypatch):
    before = PhraseCut(data_dir=str(TINY), cache_dir=str(tmp_path))
    assert before.hash == builder_module.source_hash()
    assert before.hash in before.cache_dir
    monkeypatch.setattr(builder_module, "_ROW_MODULES", (*builder_module._ROW_MODULES, "synthetic.py"))
    after = PhraseCut(data_dir=str(TINY), cache_dir=str(tmp_path))
    assert after.hash != before.hash and after.cache_dir != before.cache_dir


def test_missing_frequency_counts_fall_back_with_a_warning(tmp_path, caplog):
    raw = tmp_path / "raw"
    shutil.copytree(TINY, raw)
    (raw / "name_att_rel_count.json").unlink()
    with caplog.at_level(logging.WARNING, logger="phrasecut_dataset.builder"):
        dataset = load_phrasecut(raw, cache_dir=tmp_path / "cache", splits=["train"])
    assert "frequency-rank subsets" in caplog.text
    subsets = dataset["train"][0]["tasks"][0]["subsets"]
    assert "c20" not in subsets and "a20" not in subsets and "a_color" in subsets


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    raw = write_synthetic_phrasecut(root / "raw", {"train": 12, "val": 3, "test": 3, "miniv": 0}, seed=3)
    return raw, load_phrasecut(raw, cache_dir=root / "cache")


def test_synthetic_rows_mirror_the_raw_files(synthetic):
    raw, dataset = synthetic
    assert [len(dataset[s]) for s in dataset] == [12, 3, 3, 0]
    refer = json.loads((raw / "refer_train.json").read_text())
    rows = dataset["train"]
    assert sum(len(r["tasks"]) for r in rows) == len(refer)
    by_id = {t["task_id"]: t for t in refer}
    for row in rows:
        image = decode_image(row["image"])
        assert image.size == (row["width"], row["height"])
        for task, mask in zip(row["tasks"], row_masks(row)):
            raw_task = by_id[task["task_id"]]
            assert task["phrase"] == raw_task["phrase"]
            np.testing.assert_array_equal(
                mask, polygons_to_mask(raw_task["Polygons"], row["height"], row["width"])
            )
