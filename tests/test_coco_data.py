"""COCO instance annotations (a local folder in COCO's layout) converted to the project's rows: segmentations
decoded in all three forms, a task per category or per instance, crowds ignored or kept, bad input named or
skipped, and the synthetic COCO writer's folder read back."""

import json
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipseg_tools import coco_data
from clipseg_tools.coco_data import (
    coco_splits,
    coco_to_rows,
    decode_segmentation,
    encode_rle,
    is_coco_folder,
    read_coco_split,
    rle_counts,
)
from clipseg_tools.errors import CommandError
from clipseg_tools.own_data import mask_from_png

# Out of id order and with gaps, as in COCO: class_id follows the ids (cat 0, dog 1, bird 2).
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 12, "name": "bird"}]
SQUARE = [10, 5, 19, 5, 19, 14, 10, 14]  # x 10..19, y 5..14 with the outline drawn


def square_mask(height=30, width=40):
    mask = np.zeros((height, width), dtype=bool)
    mask[5:15, 10:20] = True
    return mask


def runs_of(mask: np.ndarray) -> list[int]:
    """The test's own RLE: run lengths over the column-major pixels, the first run counting zeros."""
    runs, value, run = [], False, 0
    for pixel in mask.T.ravel():
        if pixel != value:
            runs.append(run)
            value, run = pixel, 0
        run += 1
    return runs + [run]


def rle_string(counts: list[int]) -> str:
    """COCO's string form written from the format's description: 5 bits a character from '0' on, 0x20 for
    "more follows", 0x10 on the last character as the sign, runs from the fourth on as a difference to the
    run two before."""
    text = ""
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        while True:
            chunk, value = value & 31, value >> 5
            last = value == (-1 if chunk & 16 else 0)
            text += chr(48 + chunk + (0 if last else 32))
            if last:
                break
    return text


def annotation(ann_id, category_id, segmentation=None, image_id=1, iscrowd=0, bbox=(10, 5, 9, 9)):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [SQUARE] if segmentation is None else segmentation,
        "bbox": list(bbox),
        "iscrowd": iscrowd,
    }


def coco_folder(tmp_path, annotations, images=None, split="val", under_images=False, categories=None):
    """A COCO folder with `annotations` over 40x30 PNG images (by default image 1 "a.png" and image 2
    "b.png"); an image entry with "absent": True gets no file."""
    images = images or [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
    ]
    folder = tmp_path / "coco"
    image_dir = folder / "images" / split if under_images else folder / split
    image_dir.mkdir(parents=True)
    (folder / "annotations").mkdir()
    for image in images:
        if not image.pop("absent", False):
            Image.fromarray(np.full((30, 40, 3), 90, dtype=np.uint8)).save(image_dir / image["file_name"])
    data = {"images": images, "annotations": annotations, "categories": categories or CATEGORIES}
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return folder


def convert(folder, tmp_path, split="val", **options):
    return coco_to_rows(folder, split, cache_dir=str(tmp_path / "cache"), **options)


def masks_of(row) -> list[np.ndarray]:
    return [mask_from_png(t["mask"], row["height"], row["width"]) for t in row["tasks"]]


# -- segmentations --------------------------------------------------------------------------------------


def test_polygons_and_both_rle_forms_decode_to_the_masks_they_describe():
    assert (decode_segmentation([SQUARE], 30, 40) == square_mask()).all()
    two = [[0, 0, 3, 0, 3, 3, 0, 3], [30, 20, 35, 20, 35, 25]]  # an instance in two pieces
    assert decode_segmentation(two, 30, 40)[[0, 3, 20, 25], [0, 3, 30, 35]].all()

    # Hand-made: [[0, 1, 1], [0, 0, 1]] is 0 0 | 1 0 | 1 1 column by column: runs 2, 1, 1, 2.
    small = np.array([[0, 1, 1], [0, 0, 1]], dtype=bool)
    assert (decode_segmentation({"size": [2, 3], "counts": [2, 1, 1, 2]}, 2, 3) == small).all()
    # The same and others as strings, as pycocotools encodes them: a negative difference ("L" is -4) and
    # numbers of several characters ("T3" is 100).
    assert (decode_segmentation({"size": [2, 3], "counts": "2111"}, 2, 3) == small).all()
    assert rle_counts("053L") == [0, 5, 3, 1]
    assert (decode_segmentation({"size": [10, 10], "counts": "0T3"}, 10, 10)).all()
    rectangle = np.zeros((40, 50), dtype=bool)
    rectangle[5:30, 10:40] = True
    pycocotools_string = "e<i0?" + "0" * 57 + "[<"
    assert (decode_segmentation({"size": [40, 50], "counts": pycocotools_string}, 40, 50) == rectangle).all()

    rng = np.random.default_rng(0)
    for density in (0.05, 0.5, 0.95):
        mask = rng.random((23, 17)) < density
        counts = runs_of(mask)
        for given in (counts, rle_string(counts)):
            assert (decode_segmentation({"size": [23, 17], "counts": given}, 23, 17) == mask).all()
        assert coco_data.encode_rle(mask) == {"size": [23, 17], "counts": rle_string(counts)}


# -- tasks, crowds, classes -----------------------------------------------------------------------------


def test_one_task_per_category_with_its_instances_merged_or_one_per_instance(tmp_path):
    other = [30, 20, 35, 20, 35, 25, 30, 25]
    folder = coco_folder(
        tmp_path,
        [annotation(5, 7), annotation(6, 7, [other], bbox=(30, 20, 5, 5)), annotation(8, 3, [other])],
    )
    rows, skipped = convert(folder, tmp_path)
    (row,) = rows  # image 2 has no annotations: left out
    assert (skipped, row["image_id"], row["width"], row["height"], row["ignore"]) == (0, 1, 40, 30, b"")
    assert row["image"]["bytes"] == (folder / "val" / "a.png").read_bytes()
    assert [(t["task_id"], t["phrase"], t["class_id"]) for t in row["tasks"]] == [
        ("1_c3", "cat", 0),
        ("1_c7", "dog", 1),
    ]
    dog = row["tasks"][1]
    assert dog["instance_boxes"] == [[10, 5, 9, 9], [30, 20, 5, 5]] and dog["polygons"] == []
    cat_mask, dog_mask = masks_of(row)
    assert (dog_mask == square_mask() | decode_segmentation([other], 30, 40)).all()
    assert (cat_mask == decode_segmentation([other], 30, 40)).all()

    rows, _ = convert(folder, tmp_path, per_instance=True)
    assert [(t["task_id"], t["class_id"]) for t in rows[0]["tasks"]] == [("1_5", 1), ("1_6", 1), ("1_8", 0)]
    assert (masks_of(rows[0])[0] == square_mask()).all()


def test_crowd_regions_are_ignored_pixels_or_kept_as_instances(tmp_path, caplog):
    crowd = {"size": [30, 40], "counts": runs_of(~square_mask() & (np.arange(40) >= 25)[None, :])}
    folder = coco_folder(
        tmp_path,
        [
            annotation(5, 7),
            annotation(6, 3, crowd, iscrowd=1),
            annotation(7, 3, crowd, image_id=2, iscrowd=1),
        ],
    )
    caplog.set_level(logging.INFO, logger=coco_data.__name__)
    rows, _ = convert(folder, tmp_path)
    assert rows["image_id"] == [1]  # image 2 holds a crowd only: nothing to prompt for
    assert [t["phrase"] for t in rows[0]["tasks"]] == ["dog"]
    ignore = mask_from_png(rows[0]["ignore"], 30, 40)
    assert (ignore == decode_segmentation(crowd, 30, 40)).all()
    assert read_coco_split(folder, "val").unannotated == 1
    assert "1 image without usable annotations left out" in caplog.text

    rows, _ = convert(folder, tmp_path, crowd="keep")
    assert rows["image_id"] == [1, 2] and rows["ignore"] == [b"", b""]
    assert [t["phrase"] for t in rows[0]["tasks"]] == ["cat", "dog"]
    with pytest.raises(CommandError, match="--coco_crowd 'drop': choose one of ignore, keep"):
        convert(folder, tmp_path, crowd="drop")


def test_class_ids_index_the_names_sorted_by_coco_id_and_prompts_follow_the_template(tmp_path):
    folder = coco_folder(tmp_path, [annotation(5, 12)])
    rows, _ = convert(folder, tmp_path, class_prompt_template="a photo of a {}")
    labels = rows.features["tasks"].feature["class_id"]
    assert labels.names == ["cat", "dog", "bird"]
    task = rows[0]["tasks"][0]
    assert (task["phrase"], labels.int2str(task["class_id"])) == ("a photo of a bird", "bird")
    for template in ("a photo", "{} and {}", "a {0}", "{} {name}"):
        with pytest.raises(CommandError, match="--class_prompt_template .* must hold exactly one"):
            convert(folder, tmp_path, class_prompt_template=template)


# -- bad input ------------------------------------------------------------------------------------------


BAD_INPUTS = {
    "unknown category": (
        lambda anns, images: anns[0].update(category_id=99),
        r"image 1 \(a.png\): annotation 5 has category_id 99, which the file's categories do not list",
    ),
    "unlisted image": (
        lambda anns, images: anns[0].update(image_id=9),
        r"image 9 \(not among the file's images\): annotations \[5\] name image_id 9, which the file's images",
    ),
    "missing file": (
        lambda anns, images: images[0].update(absent=True),
        r"image 1 \(a.png\): the image file .*a.png is missing",
    ),
    "size differs": (
        lambda anns, images: images[0].update(width=41),
        "the image file is 40x30, the annotation file says 41x30: they must match",
    ),
    "unknown segmentation": (
        lambda anns, images: anns[0].update(segmentation={"points": [1, 2]}),
        "annotation 5: its segmentation .* is neither polygons .* nor RLE",
    ),
    "odd polygon": (
        lambda anns, images: anns[0].update(segmentation=[[1, 2, 3]]),
        "annotation 5: its segmentation .* is neither polygons",
    ),
    "RLE size": (
        lambda anns, images: anns[0].update(segmentation={"size": [20, 40], "counts": [800]}),
        r"annotation 5: its RLE size is 20x40 \(height x width\), the image's 30x40: they must match",
    ),
    "RLE counts": (
        lambda anns, images: anns[0].update(segmentation={"size": [30, 40], "counts": [10, 5]}),
        "annotation 5: its RLE counts cover 15 pixels, its size 30x40 has 1200",
    ),
    "RLE string": (
        lambda anns, images: anns[0].update(segmentation={"size": [30, 40], "counts": "0~"}),
        "annotation 5: its RLE string holds '~', outside COCO's encoding",
    ),
    "empty mask": (
        lambda anns, images: anns[0].update(segmentation=[[100, 100, 110, 100, 110, 110]]),
        r"the mask of 'dog' \(annotations \[5\]\) is empty",
    ),
    "outside the folder": (
        lambda anns, images: images[0].update(file_name="../secret.png"),
        r"image 1 \(../secret.png\): the file_name points outside the image folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_image_is_named_in_one_sentence_or_skipped_and_counted(tmp_path, case):
    change, said = BAD_INPUTS[case]
    anns = [annotation(5, 7), annotation(6, 3, image_id=2)]
    images = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
    ]
    change(anns, images)
    # With file_name "../secret.png" the helper writes that file: refused for where it is, not for being absent.
    folder = coco_folder(tmp_path, anns, images)
    with pytest.raises(CommandError, match=said) as error:
        convert(folder, tmp_path)
    message = str(error.value)
    assert message.startswith(str(folder / "annotations" / "instances_val.json"))
    assert message.endswith("; pass --skip_bad_samples to skip such images") and "\n" not in message
    assert not any((tmp_path / "cache" / "coco_rows").iterdir())  # nothing half-written in the cache

    rows, skipped = convert(folder, tmp_path, skip_bad=True, num_proc=2)
    assert (rows["image_id"], skipped) == ([2], 1)


def test_an_image_that_does_not_decode_is_named_or_skipped(tmp_path):
    folder = coco_folder(tmp_path, [annotation(5, 7), annotation(6, 3, image_id=2)])
    (folder / "val" / "a.png").write_bytes(b"not a picture")
    with pytest.raises(CommandError, match=r"image 1 \(a.png\): the image does not decode"):
        convert(folder, tmp_path)
    assert convert(folder, tmp_path, skip_bad=True)[1] == 1


def test_folder_and_file_problems_are_named(tmp_path):
    assert not is_coco_folder(tmp_path) and coco_splits(tmp_path) == []
    folder = coco_folder(tmp_path, [annotation(5, 7)], under_images=True)  # images/<split>/ works too
    assert is_coco_folder(folder) and coco_splits(folder) == ["val"]
    assert convert(folder, tmp_path)[0]["image_id"] == [1]

    with pytest.raises(
        CommandError, match=r"has no annotations/instances_train.json \(it has the splits \['val'\]\)"
    ):
        convert(folder, tmp_path, split="train")
    (folder / "annotations" / "instances_test.json").write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(CommandError, match=r"instances_test.json is not valid JSON \(line 2, column"):
        convert(folder, tmp_path, split="test")
    (folder / "annotations" / "instances_test.json").write_text('{"images": []}')
    with pytest.raises(CommandError, match="is not a COCO annotation file"):
        convert(folder, tmp_path, split="test")
    (folder / "annotations" / "instances_test.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": CATEGORIES})
    )
    with pytest.raises(CommandError, match="has no image folder for the split 'test'"):
        convert(folder, tmp_path, split="test")


def test_a_second_conversion_of_the_same_input_reads_the_cache(tmp_path, monkeypatch):
    folder = coco_folder(tmp_path, [annotation(5, 7)])
    first, _ = convert(folder, tmp_path)

    def not_again(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(coco_data, "convert_image", not_again)
    again, _ = convert(folder, tmp_path)
    assert again.cache_files == first.cache_files and again[0] == first[0]
    with pytest.raises(AssertionError, match="converted again"):  # other options: other rows
        convert(folder, tmp_path, per_instance=True)


# -- the synthetic writer -------------------------------------------------------------------------------


def drawn(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Flat COCO polygons drawn the way the project draws PhraseCut's: int() vertices, outline and fill."""
    canvas = Image.new("L", (width, height), 0)
    for flat in polygons:
        points = [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]
        ImageDraw.Draw(canvas).polygon(points, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def form_of(annotation: dict) -> str:
    segmentation = annotation["segmentation"]
    if annotation["iscrowd"]:
        return "crowd"
    return "polygons" if isinstance(segmentation, list) else type(segmentation["counts"]).__name__


def test_the_synthetic_coco_folder_reads_back_with_the_annotated_masks(tmp_path):
    from clipseg_tools.own_synthetic import write_coco

    folder = write_coco(tmp_path / "coco", {"train": 4, "val": 2}, seed=3)
    again = write_coco(tmp_path / "again", {"train": 4, "val": 2}, seed=3)
    written = (folder / "annotations" / "instances_train.json").read_bytes()
    assert written == (again / "annotations" / "instances_train.json").read_bytes()  # deterministic
    assert coco_splits(folder) == ["train", "val"]
    data = json.loads(written)
    assert {form_of(a) for a in data["annotations"]} == {"polygons", "list", "str", "crowd"}
    ids = sorted(c["id"] for c in data["categories"])
    assert [c["id"] for c in data["categories"]] != ids  # listed out of id order, as COCO may

    # Each instance on its own (crowds too) equals its annotation, checked with the test's own encoders.
    instances, skipped = convert(folder, tmp_path, split="train", per_instance=True, crowd="keep", num_proc=2)
    assert skipped == 0 and len(instances) == 4
    by_id = {a["id"]: a for a in data["annotations"]}
    mask_of = {}
    for row in instances:
        for task, mask in zip(row["tasks"], masks_of(row)):
            given = by_id[int(task["task_id"].split("_")[1])]
            segmentation = given["segmentation"]
            assert (task["class_id"], task["instance_boxes"]) == (
                ids.index(given["category_id"]),
                [given["bbox"]],
            )
            if isinstance(segmentation, list):
                assert (mask == drawn(segmentation, row["height"], row["width"])).all()
            else:
                counts = runs_of(mask)
                assert segmentation["counts"] in (counts, rle_string(counts))
            mask_of[given["id"]] = mask

    # By category: the union of its non-crowd instances; the crowds become the ignored pixels.
    rows, _ = convert(folder, tmp_path, split="train")
    names = [next(c["name"] for c in data["categories"] if c["id"] == i) for i in ids]
    assert rows.features["tasks"].feature["class_id"].names == names
    for row in rows:
        listed = [a for a in data["annotations"] if a["image_id"] == row["image_id"]]
        for task, mask in zip(row["tasks"], masks_of(row)):
            members = [a for a in listed if a["category_id"] == ids[task["class_id"]] and not a["iscrowd"]]
            assert (mask == np.logical_or.reduce([mask_of[a["id"]] for a in members])).all()
            assert task["phrase"] == names[task["class_id"]]
        assert len(row["tasks"]) == len({a["category_id"] for a in listed if not a["iscrowd"]})
        crowds = [mask_of[a["id"]] for a in listed if a["iscrowd"]]
        ignore = mask_from_png(row["ignore"], row["height"], row["width"]) if crowds else None
        assert (ignore == np.logical_or.reduce(crowds)).all() if crowds else row["ignore"] == b""


def test_training_and_evaluation_on_a_coco_folder(tmp_path, tiny_clip_dir):
    from test_train import run_script, train_args

    from clipseg_tools.own_synthetic import write_coco

    folder = write_coco(tmp_path / "coco", {"train": 16, "val": 4}, seed=2)
    out = tmp_path / "out"
    argv = train_args(folder, tiny_clip_dir, out, "--max_train_steps", "3", "--coco_per_instance")
    argv[argv.index("--data_dir")] = "--dataset_name"
    result = run_script(argv)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "the val split of --dataset_name" in result.stderr + result.stdout  # "val" serves as validation
    results = json.loads((out / "all_results.json").read_text())
    per_instance = sum(len(r["tasks"]) for r in coco_to_rows(folder, "val", per_instance=True)[0])
    assert results["eval_samples"] == per_instance and "eval_class_map_mean_iou" in results

    import run_eval

    summaries = run_eval.main(
        ["--model", str(out), "--dataset_name", str(folder), "--split", "val", "--output_dir", str(tmp_path / "e"),
         "--num_workers", "0", "--gallery_max", "0", "--coco_crowd", "keep"]
    )  # fmt: skip
    (summary,) = summaries.values()
    assert summary["num_phrases"] == sum(
        len(r["tasks"]) for r in coco_to_rows(folder, "val", crowd="keep")[0]
    )


@pytest.mark.slow
def test_two_processes_train_on_a_coco_folder(tmp_path, tiny_clip_dir):
    from conftest import two_process_launcher
    from test_train import run_script, train_args

    from clipseg_tools.own_synthetic import write_coco

    folder = write_coco(tmp_path / "coco", {"train": 16, "val": 4}, seed=4)
    out = tmp_path / "out"
    argv = train_args(
        folder, tiny_clip_dir, out, "--max_train_steps", "3", "--cache_dir", str(tmp_path / "cache")
    )
    argv[argv.index("--data_dir")] = "--dataset_name"
    result = run_script(argv, launcher=two_process_launcher(29553))
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and len(set(results["decoder_checksum_per_process"])) == 1
    # Both processes read the one conversion the first made: every prompt of the split scored once.
    assert results["eval_samples"] == sum(len(r["tasks"]) for r in coco_to_rows(folder, "val")[0])
    assert len(list((tmp_path / "cache" / "coco_rows").glob("val-*.arrow"))) == 1


def test_rle_counts_given_as_bytes_as_pycocotools_encodes_them():
    mask = np.zeros((6, 5), dtype=bool)
    mask[1:4, 2:5] = True
    rle = encode_rle(mask, compressed=True)
    as_bytes = {"counts": rle["counts"].encode("ascii"), "size": rle["size"]}
    assert (decode_segmentation(as_bytes, 6, 5) == mask).all()
