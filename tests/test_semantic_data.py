"""Semantic segmentation data (image + label map + id2label): a prompt per class present, ignore pixels out of
the loss and the metrics, the multi-class map scored with `evaluate`'s mean_iou definitions."""

import io
import json

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train import run_script, train_args

from clipseg_tools.class_maps import count_pairs, mean_iou_scores, predicted_map
from clipseg_tools.errors import CommandError
from clipseg_tools.metrics import confusion_counts, intersection_union
from clipseg_tools.semantic_data import load_id2label, semantic_to_rows

ID2LABEL = {0: "wall", 1: "sky", 2: "tree"}


@pytest.fixture(scope="module")
def semantic_folder(tmp_path_factory):
    from clipseg_tools.own_synthetic import write_semantic

    return write_semantic(
        tmp_path_factory.mktemp("sem") / "my_semantic", {"train": 24, "validation": 6}, seed=3
    )


def png(array: np.ndarray) -> dict:
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="PNG")
    return {"bytes": encoded.getvalue(), "path": None}


def split_of(labels: list[np.ndarray], images: list[np.ndarray] | None = None) -> datasets.Dataset:
    images = images or [np.full((*label.shape, 3), 100, dtype=np.uint8) for label in labels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict(
        {"image": [png(i) for i in images], "label": [png(label) for label in labels]}, features=features
    )


def label_map() -> np.ndarray:
    label = np.zeros((6, 8), dtype=np.uint8)  # wall everywhere,
    label[:2] = 1  # sky on top,
    label[4:, 5:] = 2  # a tree,
    label[3, :] = 255  # and a row nobody labelled
    return label


def test_each_class_present_is_a_prompt_and_the_ignore_index_is_the_ignore_region():
    from clipseg_tools.batching import row_masks
    from clipseg_tools.own_data import ignore_mask

    rows, skipped = semantic_to_rows(
        split_of([label_map()]), "image", "label", ID2LABEL, "s", "a photo of {}"
    )
    row = rows[0]
    assert skipped == 0
    assert [(t["phrase"], t["class_id"]) for t in row["tasks"]] == [
        ("a photo of wall", 0),
        ("a photo of sky", 1),
        ("a photo of tree", 2),
    ]
    assert rows.features["tasks"].feature["class_id"].names == ["wall", "sky", "tree"]
    masks = row_masks(row)
    for k, value in enumerate((0, 1, 2)):
        assert (masks[k] == (label_map() == value)).all()
    assert (ignore_mask(row, 6, 8) == (label_map() == 255)).all()


def test_reduce_labels_makes_zero_the_ignore_index_and_shifts_the_rest():
    label = label_map() + (label_map() < 255)  # ids 1..3, 0 nowhere
    label[0, 0] = 0
    rows, _ = semantic_to_rows(split_of([label]), "image", "label", ID2LABEL, "s", reduce_labels=True)
    assert [t["class_id"] for t in rows[0]["tasks"]] == [0, 1, 2]
    from clipseg_tools.own_data import ignore_mask

    expected = (label_map() == 255) | (np.arange(48).reshape(6, 8) == 0)
    assert (ignore_mask(rows[0], 6, 8) == expected).all()


@pytest.mark.parametrize(
    "label, said",
    [
        (np.full((6, 8), 7, dtype=np.uint8), "class id(s) 7 that id2label does not name"),
        (np.zeros((5, 8), dtype=np.uint8), "the label map is 8x5, its image 8x6"),
        (np.full((6, 8), 255, dtype=np.uint8), "no labelled pixel"),
        (np.zeros((6, 8, 3), dtype=np.uint8), "the label map is a RGB image"),
    ],
)
def test_a_bad_label_map_is_named_or_skipped_and_counted(label, said):
    image = np.full((6, 8, 3), 100, dtype=np.uint8)
    good = split_of([label_map()])
    bad = split_of([label], [image])
    both = datasets.concatenate_datasets([good, bad])
    with pytest.raises(CommandError, match=r"s, row 1: .*" + said.replace("(", r"\(").replace(")", r"\)")):
        semantic_to_rows(both, "image", "label", ID2LABEL, "s")
    rows, skipped = semantic_to_rows(both, "image", "label", ID2LABEL, "s", skip_bad=True)
    assert (len(rows), skipped) == (1, 1)


def test_id2label_comes_from_the_folder_or_the_flag_and_is_checked(tmp_path):
    with pytest.raises(CommandError, match="no id2label.json was found .* --id2label FILE.json"):
        load_id2label(None, str(tmp_path))
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "wall", "1": "sky"}))
    assert load_id2label(None, str(tmp_path)) == {0: "wall", 1: "sky"}
    assert load_id2label('{"3": "tree"}', str(tmp_path)) == {3: "tree"}
    (tmp_path / "bad.json").write_text('{"x": "wall"}')
    with pytest.raises(CommandError, match="is not a JSON object of class id to name"):
        load_id2label(str(tmp_path / "bad.json"), None)
    with pytest.raises(CommandError, match="class ids must be 0 to 254"):
        load_id2label('{"300": "tree"}', None)
    with pytest.raises(CommandError, match="--class_prompt_template 'a photo' must hold exactly one"):
        semantic_to_rows(split_of([label_map()]), "image", "label", ID2LABEL, "s", "a photo")


def test_the_loss_and_the_metrics_leave_the_ignore_region_out():
    from modeling_clipseg_custom import ClipSegCustomModel

    logits = torch.randn(2, 4, 4)
    labels = (torch.rand(2, 4, 4) > 0.5).float()
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    keep[:, 0] = False
    decode = ClipSegCustomModel._decode

    class Decoder:
        def decoder(self, *args):
            return logits

    _, loss = decode(Decoder(), None, None, None, None, labels, keep)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits[keep], labels[keep]))
    changed = logits.clone()
    changed[:, 0] = 100.0  # whatever the model says in the ignore region
    _, same = decode(
        type("D", (), {"decoder": lambda self, *a: changed})(), None, None, None, None, labels, keep
    )
    assert torch.allclose(loss, same)

    probs = torch.sigmoid(logits)
    labels, keep = labels.contiguous(), keep.contiguous()
    counts = confusion_counts(probs, labels, valid=keep)
    assert counts.sum(-1).tolist() == [[12] * counts.shape[1]] * 2  # 16 pixels, 4 left out
    assert torch.equal(counts, confusion_counts(probs[:, 1:].contiguous(), labels[:, 1:].contiguous()))
    inter, union = intersection_union(probs > 0.5, labels, keep)
    inter_kept, union_kept = intersection_union(probs[:, 1:] > 0.5, labels[:, 1:])
    assert torch.equal(inter, inter_kept) and torch.equal(union, union_kept)


def test_the_multi_class_map_and_its_mean_iou_against_a_hand_computed_case():
    # Three classes on a 2x3 image; the prediction is made at 2x3 too (no resize).
    probs = torch.tensor(
        [
            [[0.9, 0.8, 0.1], [0.2, 0.1, 0.1]],  # class 0
            [[0.1, 0.9, 0.6], [0.1, 0.2, 0.1]],  # class 1
            [[0.1, 0.1, 0.1], [0.7, 0.25, 0.2]],  # class 2
        ]
    )
    predicted = predicted_map(probs, (2, 3), threshold=0.3)
    assert predicted.tolist() == [[0, 1, 1], [2, 3, 3]]  # 3: no class passes 0.3
    truth = torch.tensor([[0, 0, 1], [2, 2, -1]])  # -1: ignored
    confusion = count_pairs(truth, predicted, 3).view(4, 4).numpy()
    scores = mean_iou_scores(confusion, ["a", "b", "c"])
    # class 0: truth 2 px, predicted 1 (hit): IoU 1/2, accuracy 1/2
    # class 1: truth 1 px, predicted 2 (1 hit): IoU 1/2, accuracy 1
    # class 2: truth 2 px, predicted 1 (hit; the other truth pixel got no class): IoU 1/2, accuracy 1/2
    assert scores["per_category_iou"] == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert scores["per_category_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert scores["mean_iou"] == 0.5 and scores["mean_accuracy"] == pytest.approx(2 / 3)
    assert scores["overall_accuracy"] == pytest.approx(3 / 5)
    absent = mean_iou_scores(np.array([[2, 0, 0], [0, 0, 0], [0, 0, 5]]), ["a", "b"])
    assert np.isnan(absent["per_category_iou"]["b"]) and absent["mean_iou"] == 1.0  # NaN left out of the mean
    # A class predicted where no class is (COCO's background) is a false positive of that class.
    background = count_pairs(torch.tensor([[0, 3]]), torch.tensor([[0, 0]]), 3).view(4, 4).numpy()
    assert mean_iou_scores(background, ["a", "b", "c"])["per_category_iou"]["a"] == 0.5


def test_training_and_evaluation_on_semantic_data(tmp_path, semantic_folder, tiny_clip_dir):
    out = tmp_path / "out"
    argv = train_args(
        semantic_folder, tiny_clip_dir, out, "--max_train_steps", "3", "--class_prompt_template", "a {}"
    )
    argv[argv.index("--data_dir")] = "--dataset_name"
    result = run_script(argv)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["eval_class_map_mean_iou"] <= 1 and results["eval_samples"] > 0

    import run_eval

    summaries = run_eval.main(
        ["--model", str(out), "--dataset_name", str(semantic_folder), "--split", "validation", "--output_dir",
         str(tmp_path / "eval"), "--num_workers", "0", "--gallery_max", "2", "--class_prompt_template", "a {}"]
    )  # fmt: skip
    (summary,) = summaries.values()
    assert summary["class_map"]["mean_iou"] == pytest.approx(results["eval_class_map_mean_iou"])
    assert set(summary["class_map"]["per_category_iou"]) == {"background", "circle", "square", "triangle"}
    report = (tmp_path / "eval" / "results.md").read_text()
    assert "## Multi-class map (argmax over the 4 class prompts" in report and "| triangle |" in report


def test_a_training_batch_carries_each_prompts_loss_mask(semantic_folder, tiny_clip_dir):
    from transformers import AutoTokenizer

    from clipseg_tools.batching import PhraseIndex, TrainingOptions, TrainingSamples, collate_training
    from clipseg_tools.data import load_splits
    from clipseg_tools.own_data import has_ignore_regions
    from clipseg_tools.transforms import model_inputs

    (split,) = load_splits({"--split": "train"}, dataset_name=str(semantic_folder))
    assert has_ignore_regions(split)
    options = TrainingOptions(image_size=32, phrases_per_image=2, ignore_regions=True, negative_prob=0.5)
    samples = TrainingSamples(split, PhraseIndex.from_dataset(split), options)
    items = [samples[i] for i in range(4)]
    batch = collate_training(items, AutoTokenizer.from_pretrained(tiny_clip_dir), 16, pack_labels=True)
    inputs = model_inputs(batch, "cpu")
    assert inputs["loss_mask"].shape == inputs["labels"].shape == (8, 32, 32)
    for phrase, image in enumerate(batch["image_index"].tolist()):  # negatives too: the image's region
        assert torch.equal(inputs["loss_mask"][phrase], ~items[image]["ignore"])
    assert 0 < (~inputs["loss_mask"]).sum() < inputs["loss_mask"].numel()
    assert "loss_mask" not in model_inputs(
        collate_training(
            [TrainingSamples(split, PhraseIndex.from_dataset(split), TrainingOptions(image_size=32))[0]],
            AutoTokenizer.from_pretrained(tiny_clip_dir),
            16,
        ),
        "cpu",
    )


def test_rows_of_neither_shape_are_named_with_both_ways_to_read_them():
    from clipseg_tools.data import in_project_form
    from clipseg_tools.own_data import SourceOptions

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict(
        {"image": [png(np.zeros((4, 4, 3), np.uint8))], "label": [1]}, features=features
    )
    with pytest.raises(
        CommandError,
        match=r"neither a mask column 'mask' .*--mask_column.*--label_column.*'label' column holds ClassLabel",
    ):
        in_project_form(split, "the train split", SourceOptions(), False, None)


def test_two_processes_train_on_semantic_data_and_score_the_maps_of_one(
    tmp_path, semantic_folder, tiny_clip_dir
):
    from conftest import two_process_launcher

    out = tmp_path / "out"
    argv = train_args(semantic_folder, tiny_clip_dir, out, "--max_train_steps", "3")
    argv[argv.index("--data_dir")] = "--dataset_name"
    result = run_script(argv, launcher=two_process_launcher(29547))
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2

    import run_eval  # one process, the same model and images: the confusion counts summed over two agree

    (summary,) = run_eval.main(
        ["--model", str(out), "--dataset_name", str(semantic_folder), "--split", "validation", "--output_dir",
         str(tmp_path / "eval"), "--num_workers", "0", "--gallery_max", "0"]
    ).values()  # fmt: skip
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert summary["class_map"][key] == pytest.approx(results[f"eval_class_map_{key}"], abs=1e-6)
    assert summary["num_phrases"] == results["eval_samples"]


def test_a_conversion_that_fails_leaves_nothing_in_the_cache(tmp_path):
    from clipseg_tools.data import load_splits

    labels = [label_map()] * 9 + [np.full((6, 8), 9, dtype=np.uint8)]  # the last row's id is unnamed
    (tmp_path / "src" / "data").mkdir(parents=True)
    split_of(labels).to_parquet(tmp_path / "src" / "data" / "train-00000-of-00001.parquet")
    (tmp_path / "src" / "id2label.json").write_text(json.dumps({str(k): v for k, v in ID2LABEL.items()}))
    cache = tmp_path / "cache"
    before = set(cache.rglob("cache-*.arrow"))
    for processes in (None, 2):  # with two, the first process's share finishes before the second fails
        with pytest.raises(CommandError, match="row 9: the label map holds class id"):
            load_splits(
                {"--split": "train"},
                dataset_name=str(tmp_path / "src"),
                cache_dir=str(cache),
                num_proc=processes,
            )
        assert set(cache.rglob("cache-*.arrow")) == before
    (split,) = load_splits(
        {"--split": "train"}, dataset_name=str(tmp_path / "src"), cache_dir=str(cache), skip_bad=True
    )
    assert len(split) == 9


def test_a_photo_stored_turned_is_converted_upright_as_its_label_map_is_drawn():
    from clipseg_tools.transforms import decode_pixels

    upright = np.full((40, 60, 3), 200, dtype=np.uint8)
    upright[:10, :10] = (255, 0, 0)  # a red corner, top left as people see the photo
    turned = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: viewers turn it back (270 degrees) to show it upright
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(
        turned, format="JPEG", exif=exif, quality=98
    )
    label = np.zeros((40, 60), dtype=np.uint8)
    label[:10, :10] = 1
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    split = datasets.Dataset.from_dict(
        {"image": [{"bytes": turned.getvalue(), "path": None}], "label": [png(label)]}, features=features
    )
    rows, _ = semantic_to_rows(split, "image", "label", ID2LABEL, "s")
    row = rows[0]
    assert (row["width"], row["height"]) == (60, 40)
    pixels = decode_pixels(row["image"])  # what training decodes: upright, the corner where the label has it
    assert pixels.shape == (40, 60, 3) and pixels[2, 2, 0] > 200 and pixels[2, 2, 1] < 60
    assert pixels[35, 55, 0] < 230 and abs(int(pixels[35, 55, 0]) - int(pixels[35, 55, 1])) < 30


def test_two_classes_of_one_name_and_a_hub_failure_are_said_as_they_are():
    with pytest.raises(CommandError, match="classes 0 and 2 are both named 'wall'"):
        load_id2label('{"0": "wall", "1": "sky", "2": "wall"}', None)
    with pytest.raises(
        CommandError, match=r"no id2label.json was found beside it \(LocalEntryNotFoundError: "
    ):
        load_id2label(None, "you/your-data")  # HF_HUB_OFFLINE: the reason is said, not hidden
