"""run_eval.py --compare sam3:...: a tiny random SAM 3 scored beside a CLIPSeg model (with the size and speed
table, and the multi-class map), its maps against SAM 3 run phrase by phrase, a spec that is no SAM 3, a
checkpoint of the video model."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

import run_eval
from clipseg_tools.errors import CommandError
from modeling_clipseg_custom import ClipSegCustomModel, make_processor

SAM3_SIZE = 56  # four 14-pixel patches a side, in windows of two
# Not SAM 3's defaults (0.5 each), so that the test sees them read from the saved settings.
SAM3_MEAN, SAM3_STD = [0.4, 0.5, 0.6], [0.3, 0.25, 0.2]


@pytest.fixture(scope="module")
def clipseg_folder(tmp_path_factory, tiny_clip_dir):
    torch.manual_seed(5)
    model = ClipSegCustomModel.from_clip(
        str(tiny_clip_dir), image_size=64, reduce_dim=16, extract_layers=[0, 1], decoder_intermediate_size=32
    )
    folder = tmp_path_factory.mktemp("clipseg")
    model.save_pretrained(folder)
    make_processor(AutoTokenizer.from_pretrained(tiny_clip_dir), image_size=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory, tiny_clip_dir):
    """A random tiny SAM 3 saved like a Hub checkpoint: weights, the tests' CLIP tokenizer (SAM 3's is a CLIP
    one) and the image processor's settings (written as JSON: instantiating SAM 3's image processor needs
    torchvision, which the project does not install)."""
    from transformers import Sam3Model

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    torch.manual_seed(0)
    model = Sam3Model(tiny_sam3_config(tokenizer))
    with torch.no_grad():  # wider weights and a confident presence token: maps that spread over 0 to 0.75
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.normal_(0, 0.2)
        model.detr_decoder.presence_head.layer3.bias.fill_(4.0)
    folder = tmp_path_factory.mktemp("sam3")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = {
        "image_processor_type": "Sam3ImageProcessor",
        "processor_class": "Sam3Processor",
        "size": {"height": SAM3_SIZE, "width": SAM3_SIZE},
        "mask_size": {"height": SAM3_SIZE // 14 * 4, "width": SAM3_SIZE // 14 * 4},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": SAM3_MEAN,
        "image_std": SAM3_STD,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    return folder


def tiny_sam3_config(tokenizer):
    from transformers import Sam3Config

    small = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    return Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                **small,
                "num_hidden_layers": 2,
                "image_size": SAM3_SIZE,
                "patch_size": 14,
                "window_size": 2,
                "global_attn_indexes": [1],
                "pretrain_image_size": 28,
            },
            "fpn_hidden_size": 32,
            "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]],
        },
        text_config={
            "model_type": "clip_text_model",
            **small,
            "vocab_size": len(tokenizer),
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        geometry_encoder_config={**small, "num_layers": 1},
        detr_encoder_config={**small, "num_layers": 1},
        detr_decoder_config={**small, "num_layers": 1, "num_queries": 8},
        mask_decoder_config={"hidden_size": 32, "num_attention_heads": 2},
    )


def test_sam3_is_scored_beside_clipseg_on_the_same_phrases(
    tmp_path, synthetic_data, clipseg_folder, sam3_folder
):
    out = tmp_path / "eval"
    summaries = run_eval.main(
        ["--model", str(clipseg_folder), "--compare", f"sam3:{sam3_folder}",
         "--data_dir", str(synthetic_data), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
         "--max_images", "3", "--num_workers", "0", "--gallery_max", "2"]
    )  # fmt: skip
    ours, sam3 = summaries
    assert sam3.startswith("sam3")
    assert summaries[sam3]["num_phrases"] == summaries[ours]["num_phrases"] > 0
    scores = {**summaries[sam3]["clipseg_paper_protocol"], **summaries[sam3]["official_protocol"]["all"]}
    for count in ("count", "num_samples"):
        assert scores.pop(count) == summaries[ours]["num_phrases"]
    for name, value in scores.items():
        assert math.isfinite(value) and 0 <= value <= 1, (name, value)

    markdown = (out / "results.md").read_text()
    assert markdown.count(f"| {sam3} |") >= 2  # both protocols' tables
    assert "| model | parameters | images/s |" in markdown
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["models"]) == {ours, sam3}
    speed = payload["size_and_speed"]
    from transformers import Sam3Model

    expected = {
        ours: ClipSegCustomModel.from_pretrained(clipseg_folder).num_parameters(),
        sam3: Sam3Model.from_pretrained(sam3_folder).num_parameters(),
    }
    for label, parameters in expected.items():
        assert speed[label]["parameters"] == parameters
        assert speed[label]["images_per_second"] > 0
        assert f"| {label} | {parameters:,} |" in markdown
    assert (out / "gallery" / sam3 / "index.html").is_file()


def test_sam3_gets_the_multi_class_map_of_semantic_data(tmp_path, clipseg_folder, sam3_folder):
    """Every class prompted on every image, through the same forward; the ignore region left out."""
    from clipseg_tools.own_synthetic import write_semantic

    data = write_semantic(tmp_path / "semantic", {"validation": 2}, seed=3)
    summaries = run_eval.main(
        ["--model", str(clipseg_folder), "--compare", f"sam3:{sam3_folder}", "--dataset_name", str(data),
         "--split", "validation", "--output_dir", str(tmp_path / "eval"), "--cache_dir", str(tmp_path / "c"),
         "--num_workers", "0", "--gallery_max", "0", "--class_prompt_template", "a {}"]
    )  # fmt: skip
    ours, sam3 = (summary["class_map"] for summary in summaries.values())
    assert set(sam3["per_category_iou"]) == set(ours["per_category_iou"])
    assert all(0 <= sam3[name] <= 1 for name in ("mean_iou", "mean_accuracy", "overall_accuracy"))


def test_the_maps_are_those_of_sam3_run_phrase_by_phrase(tmp_path, synthetic_data, sam3_folder):
    """Vision once per image with the phrases in slices gives SAM 3's own answer per phrase, made from its
    processor's inputs (pixels normalised with its mean and std, phrases padded to 32 tokens) and the
    instances' score-weighted union."""
    from torch.nn import functional as F

    from clipseg_tools.batching import evaluation_loader
    from clipseg_tools.data import load_splits
    from clipseg_tools.evaluation import predict_logits
    from clipseg_tools.transforms import model_inputs

    model, processor = run_eval.load_model(f"sam3:{sam3_folder}", torch.device("cpu"))
    model.prompts_per_pass = 2
    assert model.config.image_size == SAM3_SIZE
    (split,) = load_splits({"--split": "test"}, data_dir=str(synthetic_data), cache_dir=str(tmp_path / "c"))
    loader = evaluation_loader(
        split, [0, 1], model, processor.tokenizer, batch_size=2, device=torch.device("cpu")
    )
    batch = next(iter(loader))
    assert len(batch["phrases"]) > 2
    with torch.no_grad():
        probs = torch.sigmoid(predict_logits(model, model_inputs(batch, "cpu")))

    sam3 = model.model
    for phrase, image in enumerate(batch["image_index"].tolist()):
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (SAM3_MEAN, SAM3_STD))
        pixels = (batch["pixel_values"][image : image + 1].float() / 255 - mean) / std
        tokens = processor.tokenizer(
            batch["phrases"][phrase], padding="max_length", max_length=32, return_tensors="pt"
        )
        with torch.no_grad():
            output = sam3(pixel_values=pixels, **tokens)
        scores = output.pred_logits.sigmoid() * output.presence_logits.sigmoid()
        union = (scores[0, :, None, None] * output.pred_masks[0].sigmoid()).amax(dim=0)
        expected = F.interpolate(union[None, None], size=(SAM3_SIZE, SAM3_SIZE), mode="bilinear")[0, 0]
        assert (probs[phrase] - expected).abs().max() < 1e-4, phrase


def test_a_sam3_spec_that_is_no_sam3_model_is_named(tmp_path, synthetic_data, clipseg_folder, capsys):
    spec = f"sam3:{clipseg_folder}"
    argv = ["--model", str(clipseg_folder), "--compare", spec, "--data_dir", str(synthetic_data)]
    with pytest.raises(SystemExit) as stop:
        run_eval.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert (
        f"--model/--compare {spec}: is not a SAM 3 model (its config.json says model_type 'clipseg" in error
    )
    assert not (tmp_path / "out").exists()  # nothing was scored
    # The same check where the loading finds it (a Hub id is only looked at then).
    with pytest.raises(CommandError, match=r"^--model/--compare 'sam3:x' is not a SAM 3 model \("):
        from clipseg_tools.sam3_compare import load_sam3

        load_sam3(str(clipseg_folder), torch.device("cpu"), "--model/--compare 'sam3:x'")


def test_a_checkpoint_of_the_video_model_gives_its_detector(tmp_path, sam3_folder):
    """A `sam3_video` checkpoint (detector and tracker) is taken as a SAM 3: its detector's weights load."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "video"
    folder.mkdir()
    detector = json.loads((sam3_folder / "config.json").read_text())
    tracker = {"model_type": "sam3_tracker_video"}
    config = {"model_type": "sam3_video", "detector_config": detector, "tracker_config": tracker}
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(sam3_folder / "model.safetensors")
    renamed = {f"detector_model.{name}": value for name, value in weights.items()}
    save_file(
        {**renamed, "tracker_model.memory_attention.weight": torch.zeros(3)}, folder / "model.safetensors"
    )
    for file in sam3_folder.iterdir():  # the tokenizer and the image processor's settings
        if file.name not in ("config.json", "model.safetensors"):
            (folder / file.name).write_bytes(file.read_bytes())

    model, _ = run_eval.load_model(f"sam3:{folder}", torch.device("cpu"))
    loaded = model.model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in weights.items())
