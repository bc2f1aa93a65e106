"""Every kind of bad input gets a clear PhraseCutFormatError; skip_bad=True skips and counts instead."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from phrasecut_dataset import (
    PhraseCut,
    PhraseCutFormatError,
    load_phrasecut,
    prepare_phrasecut,
    write_synthetic_phrasecut,
)

TINY = Path(__file__).parent / "fixtures" / "phrasecut_tiny"
GOOD_IMAGE = 2417001  # train image with tasks "2417001__1058001" and "2417001__1058002_1058003"


@pytest.fixture
def raw(tmp_path):
    folder = tmp_path / "raw"
    shutil.copytree(TINY, folder)
    return folder


def edit_tasks(folder: Path, edit, split="train"):
    path = folder / f"refer_{split}.json"
    tasks = json.loads(path.read_text(encoding="utf-8"))
    edit(tasks)
    path.write_text(json.dumps(tasks), encoding="utf-8")


def task(tasks, task_id):
    return next(t for t in tasks if t["task_id"] == task_id)


def assert_fails(folder, cache, *fragments):
    with pytest.raises(PhraseCutFormatError) as caught:
        load_phrasecut(folder, cache_dir=cache, splits=["train"])
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    # Nothing half-written: no finished cache, no leftover temporary folder.
    assert not list(Path(cache).rglob("dataset_info.json"))
    assert not list(Path(cache).rglob("*.arrow"))
    assert not list(Path(cache).rglob("*.incomplete"))
    return caught.value


def test_missing_image(raw, tmp_path):
    (raw / "images" / f"{GOOD_IMAGE}.jpg").unlink()
    error = assert_fails(
        raw, tmp_path / "c", f"images/{GOOD_IMAGE}.jpg", "image file is missing", "skip_bad=True"
    )
    assert error.reason == "missing_image"


def test_truncated_image(raw, tmp_path):
    path = raw / "images" / f"{GOOD_IMAGE}.jpg"
    path.write_bytes(path.read_bytes()[:-200])
    assert_fails(raw, tmp_path / "c", f"{GOOD_IMAGE}.jpg", "truncated or corrupt", "skip_bad=True")


def test_file_that_is_not_an_image(raw, tmp_path):
    (raw / "images" / f"{GOOD_IMAGE}.jpg").write_text("<html>404 Not Found</html>")
    assert_fails(raw, tmp_path / "c", f"{GOOD_IMAGE}.jpg", "not an image file", "skip_bad=True")


def test_image_size_differs_from_the_metadata(raw, tmp_path):
    shutil.copy(raw / "images" / "2417004.jpg", raw / "images" / f"{GOOD_IMAGE}.jpg")  # 12x10, not 10x8
    assert_fails(raw, tmp_path / "c", "the JPEG is 12x10 but image_data_split.json says 10x8")


def test_polygon_with_fewer_than_three_points(raw, tmp_path):
    edit_tasks(raw, lambda ts: task(ts, "2417001__1058001")["Polygons"][0][0].__delitem__(slice(2, None)))
    error = assert_fails(
        raw, tmp_path / "c", "task 2417001__1058001", "2 point(s), fewer than three", "skip_bad=True"
    )
    assert error.reason == "polygon_too_few_points"


def test_polygon_entirely_outside_the_image(raw, tmp_path):
    def move_out(ts):
        task(ts, "2417001__1058002_1058003")["Polygons"][1][0] = [[12.0, 1.0], [15.0, 1.0], [15.0, 4.0]]

    edit_tasks(raw, move_out)
    assert_fails(
        raw,
        tmp_path / "c",
        "task 2417001__1058002_1058003",
        "polygon 0 of instance 1",
        "entirely outside the 10x8 image",
    )


def test_missing_task_field(raw, tmp_path):
    edit_tasks(raw, lambda ts: task(ts, "2417001__1058001").pop("Polygons"))
    assert_fails(
        raw,
        tmp_path / "c",
        "refer_train.json",
        "2417001__1058001",
        "missing field(s) Polygons",
        "skip_bad=True",
    )


def test_missing_phrase_structure_field(raw, tmp_path):
    edit_tasks(raw, lambda ts: task(ts, "2417001__1058001")["phrase_structure"].pop("type"))
    assert_fails(raw, tmp_path / "c", "task 2417001__1058001", "phrase_structure", "missing field(s) type")


def test_missing_image_id(raw, tmp_path):
    edit_tasks(raw, lambda ts: task(ts, "2417001__1058001").pop("image_id"))
    assert_fails(raw, tmp_path / "c", "entry 0 (task 2417001__1058001)", "no integer 'image_id'")


def test_boxes_that_do_not_match_the_instances(raw, tmp_path):
    edit_tasks(raw, lambda ts: task(ts, "2417001__1058002_1058003")["instance_boxes"].pop())
    assert_fails(raw, tmp_path / "c", "2417001__1058002_1058003", "one [x, y, w, h] per instance (2)")


def test_image_without_metadata(raw, tmp_path):
    path = raw / "image_data_split.json"
    path.write_text(json.dumps([e for e in json.loads(path.read_text()) if e["image_id"] != GOOD_IMAGE]))
    assert_fails(raw, tmp_path / "c", f"image {GOOD_IMAGE}", "no entry in image_data_split.json")


def test_metadata_entry_without_a_size(raw, tmp_path):
    path = raw / "image_data_split.json"
    entries = json.loads(path.read_text())
    next(e for e in entries if e["image_id"] == GOOD_IMAGE).pop("width")
    path.write_text(json.dumps(entries))
    assert_fails(
        raw, tmp_path / "c", f"image_data_split.json entry for image {GOOD_IMAGE}", "missing field(s) width"
    )


def test_malformed_json(raw, tmp_path):
    (raw / "refer_train.json").write_text('[{"task_id": ')
    assert_fails(raw, tmp_path / "c", "refer_train.json", "not valid JSON")


def test_unknown_split(tmp_path):
    with pytest.raises(
        PhraseCutFormatError, match="unknown split 'dev'; choose from train, validation, test, miniv"
    ):
        load_phrasecut(TINY, cache_dir=tmp_path, splits=["train", "dev"])
    with pytest.raises(PhraseCutFormatError, match="unknown split"):
        PhraseCut(data_dir=str(TINY), cache_dir=str(tmp_path), splits=("training",))


def test_wrong_data_dir(tmp_path):
    with pytest.raises(PhraseCutFormatError, match="is not a directory"):
        load_phrasecut(tmp_path / "nowhere", cache_dir=tmp_path / "c")
    parent = tmp_path / "data"
    shutil.copytree(TINY, parent / "VGPhraseCut_v0")
    with pytest.raises(
        PhraseCutFormatError, match=r"image_data_split.json is missing.*Did you mean .*VGPhraseCut_v0"
    ):
        load_phrasecut(parent, cache_dir=tmp_path / "c")
    with pytest.raises(PhraseCutFormatError, match="no data_dir given"):
        PhraseCut(cache_dir=str(tmp_path / "c")).download_and_prepare()


def test_missing_refer_file_for_a_requested_split(raw, tmp_path):
    (raw / "refer_test.json").unlink()
    with pytest.raises(
        PhraseCutFormatError, match=r"refer_test.json is missing for split 'test'; pass splits="
    ):
        load_phrasecut(raw, cache_dir=tmp_path / "c")
    assert list(load_phrasecut(raw, cache_dir=tmp_path / "c", splits=["train", "val", "miniv"])) == [
        "train",
        "validation",
        "miniv",
    ]


def test_skip_bad_skips_and_counts_by_reason(raw, tmp_path, caplog):
    def break_some(ts):
        task(ts, "2417001__1058001")["Polygons"][0][0] = [[1.0, 1.0], [2.0, 2.0]]  # too few points
        ts.append(
            {**task(ts, "2417001__1058001"), "task_id": "2417001__1058099", "phrase_structure": {}}
        )  # fields
        ts.append(
            {**task(ts, "2417001__1058001"), "task_id": "2417009__1058100", "image_id": 2417009}
        )  # no image

    edit_tasks(raw, break_some)
    path = raw / "image_data_split.json"
    path.write_text(
        json.dumps([*json.loads(path.read_text()), {"image_id": 2417009, "width": 5, "height": 5}])
    )
    with caplog.at_level(logging.WARNING, logger="phrasecut_dataset.builder"):
        builder = prepare_phrasecut(raw, cache_dir=tmp_path / "c", splits=["train"], skip_bad=True)
    rows = builder.as_dataset_dict()["train"]
    assert [t["task_id"] for r in rows for t in r["tasks"]] == ["2417001__1058002_1058003"]
    assert builder.skip_report["train"] == {
        "images_kept": 1,
        "tasks_kept": 1,
        "known_bad_images_skipped": 1,
        "images_skipped": {"missing_image": 1},
        "tasks_skipped": {"missing_field": 1, "polygon_too_few_points": 1},
    }
    assert (
        "PhraseCut train: kept 1 images / 1 tasks; skipped 1 known bad images (metadata size != JPEG size), "
        "1 images (missing_image: 1), 2 tasks (missing_field: 1, polygon_too_few_points: 1)"
    ) in caplog.text


def test_skip_bad_drops_an_image_left_without_valid_tasks(raw, tmp_path):
    def break_all(ts):
        for t in ts:
            t["Polygons"][0][0] = t["Polygons"][0][0][:2]

    edit_tasks(raw, break_all)
    builder = prepare_phrasecut(raw, cache_dir=tmp_path / "c", splits=["train"], skip_bad=True)
    assert len(builder.as_dataset_dict()["train"]) == 0
    assert builder.skip_report["train"]["images_skipped"] == {"no_valid_tasks": 1}
    assert builder.skip_report["train"]["tasks_skipped"] == {"polygon_too_few_points": 2}


# -- issue 16: inputs that stopped preparation with a bare traceback, or passed silently ---------------


@pytest.fixture(scope="module")
def synthetic_base(tmp_path_factory):
    """Two train images of 32x32 with their tasks, written once by the project's synthetic writer."""
    root = tmp_path_factory.mktemp("synthetic_bad")
    return write_synthetic_phrasecut(root / "raw", {"train": 2}, seed=1, min_size=32, max_size=32)


@pytest.fixture
def synthetic(synthetic_base, tmp_path):
    folder = tmp_path / "synthetic"
    shutil.copytree(synthetic_base, folder)
    return folder


def first_task(folder: Path) -> dict:
    return json.loads((folder / "refer_train.json").read_text(encoding="utf-8"))[0]


def prepared_report(folder: Path, cache: Path) -> dict:
    return prepare_phrasecut(folder, cache_dir=cache, splits=["train"], skip_bad=True).skip_report["train"]


def task_count(folder: Path) -> int:
    return len(json.loads((folder / "refer_train.json").read_text(encoding="utf-8")))


@pytest.mark.parametrize("limit, outcome", [(1500, "error"), (3000, "warning")])
def test_an_image_over_pillows_size_limit_is_named_and_skippable(
    synthetic, tmp_path, monkeypatch, limit, outcome
):
    """64x64 = 4096 pixels: over 2 x 1500 Pillow raises DecompressionBombError, over 3000 it only warns; both
    are refused (the 32x32 images stay under either limit)."""
    image_id = first_task(synthetic)["image_id"]
    path = synthetic / "images" / f"{image_id}.jpg"
    with Image.open(path) as image:
        image.resize((64, 64)).save(path)
    metadata = synthetic / "image_data_split.json"
    entries = json.loads(metadata.read_text())
    next(e for e in entries if e["image_id"] == image_id).update(width=64, height=64)
    metadata.write_text(json.dumps(entries))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    error = assert_fails(
        synthetic, tmp_path / "c", f"images/{image_id}.jpg", "Pillow's size limit", "--skip_bad_samples"
    )
    assert error.reason == "image_too_large" and len(str(error).splitlines()) == 1
    report = prepared_report(synthetic, tmp_path / "skip")
    assert report["images_skipped"] == {"image_too_large": 1} and report["images_kept"] == 1


def test_a_non_integer_coco_id_is_named_and_skippable(synthetic, tmp_path):
    image_id = first_task(synthetic)["image_id"]
    metadata = synthetic / "image_data_split.json"
    entries = json.loads(metadata.read_text())
    next(e for e in entries if e["image_id"] == image_id)["coco_id"] = "12a"
    metadata.write_text(json.dumps(entries))
    error = assert_fails(
        synthetic,
        tmp_path / "c",
        f"image_data_split.json entry for image {image_id}",
        "'coco_id' must be an integer or null, found '12a'",
        "--skip_bad_samples",
    )
    assert error.reason == "bad_field"
    report = prepared_report(synthetic, tmp_path / "skip")
    assert report["images_skipped"] == {"bad_field": 1} and report["images_kept"] == 1


@pytest.mark.parametrize("field", ["phrase", "name", "attribute"])
def test_a_lone_surrogate_in_a_phrase_is_named_and_skippable(synthetic, tmp_path, field):
    def break_text(ts):
        structure = ts[0]["phrase_structure"]
        if field == "phrase":
            ts[0]["phrase"] = "red \ud800 circle"
        elif field == "name":
            structure["name"] = "circle\udfff"
        else:
            structure["attributes"] = [*structure["attributes"], "\ud83d"]

    edit_tasks(synthetic, break_text)
    assert "\\ud" in (synthetic / "refer_train.json").read_text()  # written as a JSON escape, as in the wild
    task_id = first_task(synthetic)["task_id"]
    error = assert_fails(
        synthetic,
        tmp_path / "c",
        "refer_train.json",
        f"task {task_id}",
        "lone surrogate",
        "--skip_bad_samples",
    )
    assert error.reason == "bad_text"
    report = prepared_report(synthetic, tmp_path / "skip")
    assert report["tasks_skipped"] == {"bad_text": 1}
    assert report["tasks_kept"] == task_count(synthetic) - 1


def test_a_repeated_task_id_is_named_and_skipping_keeps_the_first(synthetic, tmp_path):
    edit_tasks(synthetic, lambda ts: ts.append({**ts[0], "phrase": "another phrase"}))
    task_id = first_task(synthetic)["task_id"]
    error = assert_fails(
        synthetic,
        tmp_path / "c",
        "refer_train.json",
        f"task {task_id}",
        "more than once",
        "--skip_bad_samples",
    )
    assert error.reason == "duplicate_task_id"
    builder = prepare_phrasecut(synthetic, cache_dir=tmp_path / "skip", splits=["train"], skip_bad=True)
    tasks = [t for row in builder.as_dataset_dict()["train"] for t in row["tasks"]]
    assert len(tasks) == task_count(synthetic) - 1 == len({t["task_id"] for t in tasks})
    assert next(t for t in tasks if t["task_id"] == task_id)["phrase"] == first_task(synthetic)["phrase"]
    assert builder.skip_report["train"]["tasks_skipped"] == {"duplicate_task_id": 1}


@pytest.mark.parametrize("axis, value", [(0, 1e12), (1, -1e12), (0, 97.0), (1, -33.0)])
def test_a_vertex_far_outside_the_image_is_named_and_skippable(synthetic, tmp_path, axis, value):
    """The images are 32x32: a vertex more than one image side beyond an edge (x > 64, y < -32) is refused."""
    edit_tasks(synthetic, lambda ts: ts[0]["Polygons"][0][0][0].__setitem__(axis, value))
    task_id = first_task(synthetic)["task_id"]
    error = assert_fails(
        synthetic, tmp_path / "c", f"task {task_id}", "polygon 0 of instance 0", "far outside the 32x32 image"
    )
    assert error.reason == "polygon_far_outside_image"
    report = prepared_report(synthetic, tmp_path / "skip")
    assert report["tasks_skipped"] == {"polygon_far_outside_image": 1}


@pytest.mark.parametrize("value", [-32.0, 64.0])
def test_a_vertex_up_to_one_image_side_outside_is_kept(synthetic, tmp_path, value):
    edit_tasks(synthetic, lambda ts: ts[0]["Polygons"][0][0][0].__setitem__(0, value))
    rows = load_phrasecut(synthetic, cache_dir=tmp_path / "c", splits=["train"])["train"]
    assert sum(len(row["tasks"]) for row in rows) == task_count(synthetic)


@pytest.mark.parametrize("phrase", ["", " \t\n"])
def test_an_empty_phrase_is_named_and_skippable(synthetic, tmp_path, phrase):
    edit_tasks(synthetic, lambda ts: ts[0].__setitem__("phrase", phrase))
    task_id = first_task(synthetic)["task_id"]
    error = assert_fails(synthetic, tmp_path / "c", f"task {task_id}", "empty phrase", "--skip_bad_samples")
    assert error.reason == "empty_phrase"
    report = prepared_report(synthetic, tmp_path / "skip")
    assert report["tasks_skipped"] == {"empty_phrase": 1}
    assert report["tasks_kept"] == task_count(synthetic) - 1


def test_every_skippable_error_names_the_flag_and_the_keyword(raw, tmp_path):
    """Command-line users read --skip_bad_samples, Python users skip_bad=True, in the builder's messages too."""
    edit_tasks(raw, lambda ts: task(ts, "2417001__1058001").pop("image_id"))
    assert_fails(raw, tmp_path / "a", "no integer 'image_id'", "--skip_bad_samples", "skip_bad=True")
    shutil.copy(TINY / "refer_train.json", raw / "refer_train.json")
    path = raw / "image_data_split.json"
    path.write_text(json.dumps([e for e in json.loads(path.read_text()) if e["image_id"] != GOOD_IMAGE]))
    assert_fails(
        raw, tmp_path / "b", "no entry in image_data_split.json", "--skip_bad_samples", "skip_bad=True"
    )
