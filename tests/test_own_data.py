"""A user's own referring rows (image, binary masks, prompts): converted once to the project's rows, trained on
and scored like PhraseCut, bad rows named or skipped."""

import io
import json

import datasets
import numpy as np
import pytest
from PIL import Image
from test_train import run_script, train_args

from clipseg_tools.errors import CommandError
from clipseg_tools.own_data import ReferringColumns, referring_to_rows


@pytest.fixture(scope="module")
def referring_folder(tmp_path_factory):
    """The synthetic referring data as a user would have it: a Parquet folder, train and test, no validation."""
    from clipseg_tools.own_synthetic import write_referring

    return write_referring(tmp_path_factory.mktemp("own") / "my_data", {"train": 24, "test": 6}, seed=5)


def png(array: np.ndarray, mode: str | None = None) -> dict:
    encoded = io.BytesIO()
    Image.fromarray(array, mode).save(encoded, format="PNG")
    return {"bytes": encoded.getvalue(), "path": None}


def one_row_split(image, masks, prompts) -> datasets.Dataset:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.List(datasets.Image()),
            "prompt": datasets.List(datasets.List(datasets.Value("string"))),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": [image], "mask": [masks], "prompt": [prompts]}, features=features
    )


def test_referring_rows_become_one_row_per_image_with_a_task_per_mask_and_its_wordings(referring_folder):
    from clipseg_tools.batching import PhraseIndex, task_mask
    from clipseg_tools.data import load_splits

    source = datasets.load_dataset(str(referring_folder))["test"]
    (rows,) = load_splits({"--split": "test"}, dataset_name=str(referring_folder))
    assert len(rows) == len(source)
    first, given = rows[0], source[0]
    assert len(first["tasks"]) == len(given["mask"])
    for task, prompts in zip(first["tasks"], given["prompt"], strict=True):  # two wordings per mask
        assert [task["phrase"], *task["other_phrases"]] == prompts
    for k, mask in enumerate(given["mask"]):
        expected = np.asarray(mask.convert("L")) > 0
        assert (task_mask(first["tasks"][k], first, first["height"], first["width"]) == expected).all()
    assert len(PhraseIndex.from_dataset(rows)) == sum(len(t) for t in rows["tasks"])


def test_training_and_evaluation_on_your_own_data(tmp_path, referring_folder, tiny_clip_dir):
    out = tmp_path / "out"
    argv = train_args(referring_folder, tiny_clip_dir, out, "--max_train_steps", "3")
    argv[argv.index("--data_dir")] = "--dataset_name"
    result = run_script(argv)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "has no 'validation' split: 10% of 'train' held out (3 images, seed 42)" in result.stdout
    card = (out / "README.md").read_text()
    assert "10% of 'train' held out" in card and "my_data (see its own card)" in card
    assert "PhraseCut: Language-based" not in card
    assert (
        "name: Text-prompted segmentation" in card
    )  # the model-index does not call it referring expressions
    assert json.loads((out / "all_results.json").read_text())["eval_samples"] > 0

    import run_eval

    summaries = run_eval.main(
        ["--model", str(out), "--dataset_name", str(referring_folder), "--split", "test", "--output_dir",
         str(tmp_path / "eval"), "--num_workers", "0", "--gallery_max", "0"]
    )  # fmt: skip
    (summary,) = summaries.values()
    assert summary["num_phrases"] == sum(
        len(m) for m in datasets.load_dataset(str(referring_folder))["test"]["mask"]
    )
    report = (tmp_path / "eval" / "results.md").read_text()
    assert "At each image's own size" in report and "paper:" not in report


@pytest.mark.parametrize(
    "change, said",
    [
        (lambda img, m, p: (img, [m[0][:, :-1]], p), "mask 0 is 39x30, its image 40x30: they must match"),
        (lambda img, m, p: (img, [m[0].astype(np.uint8) * 7 + 1], p), "mask 0 is not binary"),
        (lambda img, m, p: (img, [np.zeros_like(m[0])], p), "mask 0 is empty"),
        (lambda img, m, p: (img, m, [["  "]]), "mask 0 has an empty or non-text prompt"),
        (lambda img, m, p: (img, m + m, p), "2 mask(s) but prompts"),
    ],
)
def test_a_bad_row_is_named_or_skipped_and_counted(change, said):
    image = np.full((30, 40, 3), 120, dtype=np.uint8)
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:15, 10:20] = 255
    picture, masks, prompts = change(image, [mask], [["a square"]])
    split = one_row_split(png(picture), [png(m) for m in masks], prompts)
    with pytest.raises(CommandError, match="row 0: " + said.replace("(", r"\(").replace(")", r"\)")) as error:
        referring_to_rows(split, ReferringColumns(), "my split")
    assert "--skip_bad_samples" in str(error.value)
    converted, skipped = referring_to_rows(split, ReferringColumns(), "my split", skip_bad=True)
    assert (len(converted), skipped) == (0, 1)


def test_a_missing_column_or_a_file_outside_the_data_is_refused_by_name(tmp_path):
    image = np.full((30, 40, 3), 120, dtype=np.uint8)
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:15, 10:20] = 255
    split = one_row_split(png(image), [png(mask)], [["a square"]])
    with pytest.raises(CommandError, match="has no column 'segmentation'.*--mask_column"):
        referring_to_rows(split, ReferringColumns(mask="segmentation"), "my split")

    # An image cell that names a file instead of holding bytes: read inside the data's folder, never outside.
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(image).save(folder / "a.png")
    elsewhere = tmp_path / "secret.png"
    Image.fromarray(image).save(elsewhere)
    for path, ok in ((folder / "a.png", True), (elsewhere, False)):
        named = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": None, "path": str(path)}],
                "mask": [[png(mask)]],
                "prompt": [[["a square"]]],
            },
            features=split.features,
        )
        if ok:
            converted, _ = referring_to_rows(named, ReferringColumns(), "my split", local_root=str(folder))
            assert converted[0]["image"]["bytes"] == path.read_bytes()
        else:
            with pytest.raises(CommandError, match="outside the data set's folder"):
                referring_to_rows(named, ReferringColumns(), "my split", local_root=str(folder))


def test_training_images_shrunk_keep_their_masks(referring_folder):
    from clipseg_tools.batching import task_mask
    from clipseg_tools.data import load_splits, shrink_row

    (rows,) = load_splits({"--split": "test"}, dataset_name=str(referring_folder))
    row = rows[0]
    small = shrink_row(row, short_side=64)
    assert min(small["width"], small["height"]) == 64
    full = task_mask(row["tasks"][0], row, row["height"], row["width"])
    shrunk = task_mask(small["tasks"][0], small, small["height"], small["width"])
    expected = np.asarray(Image.fromarray(full).resize((small["width"], small["height"]), Image.NEAREST))
    assert (shrunk == expected).all()


def test_two_processes_train_on_your_own_data_and_score_each_prompt_once(
    tmp_path, referring_folder, tiny_clip_dir
):
    from test_train import two_process_launcher

    out = tmp_path / "ddp"
    argv = train_args(
        referring_folder, tiny_clip_dir, out, "--max_train_steps", "4", "--dataloader_num_workers", "1"
    )
    argv[argv.index("--data_dir")] = "--dataset_name"
    result = run_script(argv, launcher=two_process_launcher(29531))
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert len(set(results["decoder_checksum_per_process"])) == 1
    # The held-out share is the same on both processes: every prompt of it scored once.
    train = datasets.load_dataset(str(referring_folder))["train"]
    held = train.train_test_split(test_size=0.1, seed=42)["test"]
    assert results["eval_samples"] == sum(len(masks) for masks in held["mask"])


def test_a_training_sample_draws_one_wording_of_its_mask_per_step(referring_folder):
    from clipseg_tools.batching import PhraseIndex, TrainingOptions, TrainingSamples
    from clipseg_tools.data import load_splits

    (rows,) = load_splits({"--split": "train"}, dataset_name=str(referring_folder))
    options = TrainingOptions(image_size=32, negative_prob=0.0, prompt_template="plain", random_crop=False)
    samples = TrainingSamples(rows, PhraseIndex.from_dataset(rows), options)
    index = samples.index
    first = index.row_starts[0]  # the first mask of the first image: its two wordings over many epochs
    task = rows[0]["tasks"][0]
    drawn = [samples[epoch * len(samples) + first]["phrases"][0] for epoch in range(12)]
    assert set(drawn) == {task["phrase"], *task["other_phrases"]}
    assert drawn == [samples[epoch * len(samples) + first]["phrases"][0] for epoch in range(12)]  # seeded


def test_masks_given_as_polygons_or_coco_rle_become_the_same_stored_masks():
    from clipseg_tools.batching import task_mask
    from clipseg_tools.coco_data import encode_rle

    image = png(np.full((30, 40, 3), 90, dtype=np.uint8))
    square = np.zeros((30, 40), dtype=bool)
    square[5:15, 10:20] = True
    polygon = [[10, 5, 19, 5, 19, 14, 10, 14]]  # COCO polygons: per mask a list of flat x, y lists
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "rle": datasets.List(
                {"counts": datasets.Value("string"), "size": datasets.List(datasets.Value("int64"))}
            ),
            "polygons": datasets.List(datasets.List(datasets.List(datasets.Value("float64")))),
            "prompt": datasets.List(datasets.Value("string")),
        }
    )
    rle = encode_rle(square, compressed=True)
    split = datasets.Dataset.from_dict(
        {"image": [image], "rle": [[rle, rle]], "polygons": [[polygon, polygon]], "prompt": [["a", "b"]]},
        features=features,
    )
    for column in ("rle", "polygons"):
        rows, _ = referring_to_rows(split, ReferringColumns(mask=column), "my split")
        (row,) = rows
        assert [t["phrase"] for t in row["tasks"]] == ["a", "b"]
        for task in row["tasks"]:
            assert (task_mask(task, row, 30, 40) == square).all()
    bad = split.map(lambda r: {"rle": [{"counts": "02", "size": [30, 40]}] * 2})
    with pytest.raises(CommandError, match=r"row 0: mask 0: its RLE counts cover .*--skip_bad_samples"):
        referring_to_rows(bad, ReferringColumns(mask="rle"), "my split")
    with pytest.raises(CommandError, match="the --mask_column prompt column holds .* not masks"):
        referring_to_rows(split, ReferringColumns(mask="prompt", prompt="prompt"), "my split")


def test_a_hub_data_set_of_image_files_is_read_from_the_download_caches_only(tmp_path, monkeypatch):
    from clipseg_tools.data import data_folders

    cache = tmp_path / "datasets_cache"
    (cache / "downloads").mkdir(parents=True)
    image = np.full((30, 40, 3), 120, dtype=np.uint8)
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:15, 10:20] = 255
    Image.fromarray(image).save(cache / "downloads" / "a.png")
    Image.fromarray(mask).save(cache / "downloads" / "a_mask.png")
    Image.fromarray(image).save(tmp_path / "elsewhere.png")
    features = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.Image(), "prompt": datasets.Value("string")}
    )

    def split(image_path):  # as `datasets` keeps an imagefolder's cells: the path, no bytes
        cells = {"image": [{"bytes": None, "path": str(image_path)}], "prompt": ["a square"]}
        cells["mask"] = [{"bytes": None, "path": str(cache / "downloads" / "a_mask.png")}]
        return datasets.Dataset.from_dict(cells, features=features)

    roots = data_folders("you/your-data", str(cache))
    rows, _ = referring_to_rows(
        split(cache / "downloads" / "a.png"), ReferringColumns(), "s", local_root=roots
    )
    assert len(rows) == 1
    with pytest.raises(
        CommandError, match="elsewhere.png instead of holding its bytes, outside the data set's"
    ):
        referring_to_rows(split(tmp_path / "elsewhere.png"), ReferringColumns(), "s", local_root=roots)
