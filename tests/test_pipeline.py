"""The image-segmentation pipeline saved with every model: loaded by transformers' `pipeline()` from the model's
folder (trust_remote_code), its masks equal to `predict()`'s, for our models and stock CLIPSeg folders."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, pipeline

from modeling_clipseg_custom import ClipSegCustomModel, make_processor
from pipeline_clipseg import clipseg_pipeline, multiclass_masks

PROMPTS = ["red circle", "blue square", "green star"]
BIAS = -0.8  # the tiny random model's maps then straddle the 0.3 threshold (checked below)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_clip_dir):
    """A tiny model saved as ours and as a stock transformers CLIPSeg checkpoint, and two photos as files."""
    torch.manual_seed(7)
    model = ClipSegCustomModel.from_clip(
        str(tiny_clip_dir), image_size=64, reduce_dim=16, extract_layers=[0, 1], decoder_intermediate_size=32
    ).eval()
    with torch.no_grad():  # foreground in some pixels and not in others
        model.decoder.transposed_convolution[-1].bias.fill_(BIAS)
    processor = make_processor(AutoTokenizer.from_pretrained(tiny_clip_dir), image_size=64)
    root = tmp_path_factory.mktemp("pipeline")
    model.save_pretrained(root / "ours")
    processor.save_pretrained(root / "ours")
    model.save_as_clipseg(root / "stock", processor=processor)
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (90, 70)), ("b.png", (50, 120))):
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(root / name)
    return root, model, processor


def test_a_saved_model_carries_its_pipeline_and_pipeline_builds_it(saved):
    root, model, processor = saved
    config = json.loads((root / "ours" / "config.json").read_text())
    assert (
        config["custom_pipelines"]["image-segmentation"]["impl"]
        == "pipeline_clipseg.ClipSegSegmentationPipeline"
    )
    assert (root / "ours" / "pipeline_clipseg.py").is_file()
    segmenter = pipeline("image-segmentation", model=str(root / "ours"), trust_remote_code=True)
    assert type(segmenter).__name__ == "ClipSegSegmentationPipeline"

    results = segmenter([str(root / "a.jpg"), root / "b.png"], prompts=PROMPTS, batch_size=2)
    for name, found in zip(("a.jpg", "b.png"), results, strict=True):
        photo = Image.open(root / name).convert("RGB")
        (maps,) = model.predict(photo, PROMPTS, processor=processor)
        assert [r["label"] for r in found] == PROMPTS
        for result, probabilities in zip(found, maps, strict=True):
            assert result["mask"].size == photo.size and result["mask"].mode == "L"
            assert np.array_equal(
                np.asarray(result["mask"]), (probabilities > 0.3).numpy().astype(np.uint8) * 255
            )
            assert result["score"] == pytest.approx(float(probabilities.max()))
            assert 0 < (probabilities > 0.3).float().mean() < 1  # the comparison means something


def test_probability_maps_example_images_and_the_multiclass_mode(saved):
    root, model, processor = saved
    segmenter = clipseg_pipeline(str(root / "ours"))
    photo = Image.open(root / "a.jpg").convert("RGB")
    example = Image.open(root / "b.png")
    (text, visual) = segmenter(photo, prompts=["red circle", example], threshold=None)
    (maps,) = model.predict(photo, ["red circle", example.convert("RGB")], processor=processor)
    assert visual["label"] == "example image 1"
    assert np.array_equal(np.asarray(text["mask"]), (maps[0] * 255).round().numpy().astype(np.uint8))
    assert np.array_equal(np.asarray(visual["mask"]), (maps[1] * 255).round().numpy().astype(np.uint8))

    shares = segmenter(photo, prompts=PROMPTS, multiclass=True)
    stacked = np.stack([np.asarray(s["mask"]) > 0 for s in shares])
    assert stacked.sum(axis=0).max() <= 1  # no pixel in two masks
    (full,) = model.predict(photo, PROMPTS, processor=processor)
    winner = full.argmax(dim=0).numpy()
    passed = (full.max(dim=0).values > 0.3).numpy()
    for k in range(len(PROMPTS)):
        assert np.array_equal(stacked[k], (winner == k) & passed)


def test_multiclass_masks_against_a_hand_computed_case():
    maps = torch.tensor([[[0.9, 0.2, 0.1]], [[0.5, 0.6, 0.25]]])  # two prompts, three pixels
    masks = multiclass_masks(maps, threshold=0.3)
    assert masks.tolist() == [[[255, 0, 0]], [[0, 255, 0]]]  # the third pixel passes no threshold


def test_a_stock_clipseg_folder_gives_the_same_masks_as_ours(saved):
    root, _, _ = saved
    photo = str(root / "a.jpg")
    ours = clipseg_pipeline(str(root / "ours"))(photo, prompts=PROMPTS, threshold=None)
    stock = clipseg_pipeline(str(root / "stock"))(photo, prompts=PROMPTS, threshold=None)
    for a, b in zip(ours, stock, strict=True):
        assert np.abs(np.asarray(a["mask"]).astype(int) - np.asarray(b["mask"]).astype(int)).max() <= 1


def test_bad_prompts_and_images_are_named(saved, tmp_path):
    root, _, _ = saved
    segmenter = clipseg_pipeline(str(root / "ours"))
    with pytest.raises(ValueError, match=r"prompts\[1\] is an empty phrase"):
        segmenter(str(root / "a.jpg"), prompts=["red circle", "  "])
    with pytest.raises(ValueError, match="give the prompts"):
        segmenter(str(root / "a.jpg"))
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    with pytest.raises(ValueError, match=r"images\[0\]: .*broken.jpg could not be read as an image"):
        segmenter(str(tmp_path / "broken.jpg"), prompts=PROMPTS)


def test_arguments_given_when_the_pipeline_is_made_hold_and_images_are_read_a_batch_at_a_time(
    saved, monkeypatch
):
    root, _, _ = saved
    segmenter = pipeline(
        "image-segmentation", model=str(root / "ours"), trust_remote_code=True,
        prompts=PROMPTS[:2], threshold=0.99, batch_size=2,
    )  # fmt: skip
    chunks = []
    original = segmenter.model.predict
    monkeypatch.setattr(
        segmenter.model,
        "predict",
        lambda images, *a, **k: chunks.append(len(images)) or original(images, *a, **k),
    )
    photos = (str(root / name) for name in ["a.jpg", "b.png", "a.jpg"])  # a generator
    results = segmenter(photos)
    assert chunks == [2, 1] and len(results) == 3
    assert [r["label"] for r in results[0]] == PROMPTS[:2]
    assert all(np.asarray(r["mask"]).max() == 0 for found in results for r in found)  # nothing above 0.99
    (found,) = segmenter([str(root / "a.jpg")], threshold=0.0)  # the call's own argument wins
    assert all(np.asarray(r["mask"]).min() == 255 for r in found)


def test_a_model_saved_without_the_pipeline_file_does_not_name_it(saved, tmp_path, monkeypatch):
    import modeling_clipseg_custom

    root, model, processor = saved
    monkeypatch.setattr(modeling_clipseg_custom, "PIPELINE_FILE", "no_such_pipeline.py")
    reloaded = ClipSegCustomModel.from_pretrained(root / "ours")  # its config names the pipeline
    reloaded.save_pretrained(tmp_path / "resaved")
    assert "custom_pipelines" not in json.loads((tmp_path / "resaved" / "config.json").read_text())
    with pytest.raises(ValueError, match="would push the model without its pipeline"):
        model.save_pretrained(tmp_path / "pushed", push_to_hub=True)
