"""`run_train.py --tune decoder|lora|last_blocks|full` on a tiny CLIP and synthetic data: what each mode trains
(and that everything else stays bitwise as it started), LoRA's save / load / merge round trips, exact resume in
every mode, two processes in LoRA mode, and the refusals of flags that do not fit."""

import json
import warnings

import pytest
import torch
from conftest import two_process_launcher
from safetensors.torch import load_file
from test_train import run_script, train_args
from transformers import AutoProcessor, CLIPModel

from modeling_clipseg_custom import ClipSegCustomModel

MODES = {
    "decoder": [],
    "lora": ["--tune", "lora", "--lora_targets", "q_proj", "v_proj", "fc1", "--lora_rank", "4"],
    "last_blocks": ["--tune", "last_blocks", "--unfreeze_last_blocks", "1"],
    "full": ["--tune", "full"],
}
# The tiny model runs vision blocks 0 and 1 (--extract_layers 0 1) of the tiny CLIP's 3.
USED_VISION_BLOCKS = 2


def starting_clip(tiny_clip_dir) -> dict[str, torch.Tensor]:
    return {f"clip.{k}": v for k, v in CLIPModel.from_pretrained(tiny_clip_dir).state_dict().items()}


def changed_clip_keys(saved: dict, start: dict) -> set[str]:
    """CLIP's saved tensors that differ from the starting CLIP's in any bit."""
    return {key for key, value in start.items() if not torch.equal(saved[key], value)}


def expected_changes(mode: str, start: dict) -> set[str]:
    """What each mode may change: nothing, nothing (the adapter lies beside), the last block the model runs,
    or everything the segmentation runs (text tower, vision tower up to its last extracted block)."""
    if mode in ("decoder", "lora"):
        return set()
    last = f"clip.vision_model.encoder.layers.{USED_VISION_BLOCKS - 1}."
    if mode == "last_blocks":
        return {key for key in start if key.startswith(last)}
    used = [f"clip.vision_model.encoder.layers.{i}." for i in range(USED_VISION_BLOCKS)]
    used += ["clip.text_model.", "clip.text_projection.", "clip.vision_model.embeddings."]
    used += ["clip.vision_model.pre_layrnorm."]
    return {key for key in start if key.startswith(tuple(used)) and not key.endswith("position_ids")}


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_trains_what_it_names_and_nothing_else(tmp_path, synthetic_data, tiny_clip_dir, mode):
    out = tmp_path / mode
    argv = train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "3", *MODES[mode])
    result = run_script(argv)
    assert result.returncode == 0, result.stderr[-4000:]
    start = starting_clip(tiny_clip_dir)
    saved = load_file(out / "model.safetensors")
    changed = changed_clip_keys(saved, start)
    expected = expected_changes(mode, start)
    # Every tensor of the parts trained moved (a gradient reached it), no other moved by a bit.
    assert changed == expected, sorted(changed ^ expected)[:5]
    assert (out / "clip_adapter" / "adapter_config.json").exists() == (mode == "lora")
    card = (out / "README.md").read_text()
    assert ("--tune decoder" in card) if mode == "decoder" else (f"--tune {mode}" in card)
    assert "Trained:" in card and "parameters" in card


def test_lora_saves_loads_and_merges_to_the_same_logits(tmp_path, synthetic_data, tiny_clip_dir):
    """A LoRA run saves the starting weights with the adapter beside them (small); from_pretrained applies it;
    merging it, --merge_adapter, and the stock CLIPSeg export give the same logits."""
    lora = ["--tune", "lora", "--lora_rank", "4", "--backbone_learning_rate", "3e-2"]  # adapters that matter
    out = tmp_path / "lora"
    result = run_script(train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "4", *lora))
    assert result.returncode == 0, result.stderr[-4000:]
    adapter_size = (out / "clip_adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_size < (out / "model.safetensors").stat().st_size / 4
    listed = json.loads((out / "run_files.json").read_text())["files"]
    assert {"clip_adapter/adapter_config.json", "clip_adapter/adapter_model.safetensors"} <= set(
        listed
    )  # pushed

    from peft import PeftModel  # the adapter is peft's own, for the CLIP alone: peft loads it, every key

    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Found missing adapter keys")
        clip = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), out / "clip_adapter")
    saved = load_file(out / "clip_adapter" / "adapter_model.safetensors")
    loaded = {name: p for name, p in clip.named_parameters() if "lora_" in name}
    assert len(loaded) == len(saved) and any(p.abs().sum() > 0 for n, p in loaded.items() if "lora_B" in n)

    model = ClipSegCustomModel.from_pretrained(out).eval()
    assert model.has_clip_adapter and not model.backbone_trainable
    processor = AutoProcessor.from_pretrained(out)
    inputs = {
        "pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        **processor.tokenizer(["red circle", "blue square", "green"], padding=True, return_tensors="pt"),
        "image_index": torch.tensor([0, 1, 1]),
    }
    with torch.no_grad():
        with_adapter = model(**inputs).logits
        base = ClipSegCustomModel.from_pretrained(out).eval()
        base_logits = base.without_clip_adapter(merge=False)(**inputs).logits
        merged = base.merge_clip_adapter()
        assert not merged.has_clip_adapter
        merged_logits = merged(**inputs).logits
    assert not torch.allclose(with_adapter, base_logits, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(merged_logits, with_adapter, rtol=1e-4, atol=1e-4)

    merged_run = tmp_path / "merged"
    argv = train_args(
        synthetic_data, tiny_clip_dir, merged_run, "--max_train_steps", "4", *lora, "--merge_adapter"
    )
    assert run_script(argv).returncode == 0
    assert not (merged_run / "clip_adapter").exists()
    reloaded = ClipSegCustomModel.from_pretrained(merged_run).eval()
    assert not reloaded.has_clip_adapter
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, with_adapter, rtol=1e-4, atol=1e-4)

    # The pipeline (the model's own code, through trust_remote_code) and the ONNX export apply it too.
    import numpy as np
    from PIL import Image
    from transformers import CLIPSegForImageSegmentation, pipeline

    from clipseg_tools.onnx_export import main as export
    from clipseg_tools.onnx_runtime import OnnxClipSeg

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(out), trust_remote_code=True)
    expected = model.predict(photo, ["red circle"], processor)[0][0]
    found = segmenter(photo, prompts=["red circle"], threshold=None)[0]
    assert np.abs(np.asarray(found["mask"], dtype=float) / 255 - expected.numpy()).max() <= 0.5 / 255 + 1e-6
    assert export(["--model", str(out), "--output", str(tmp_path / "onnx"), "--quantize", "none"]) == 0
    got = OnnxClipSeg(tmp_path / "onnx").logits(
        inputs["pixel_values"].numpy(), inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
        inputs["image_index"].numpy(),
    )  # fmt: skip
    np.testing.assert_allclose(got, with_adapter.numpy(), rtol=1e-4, atol=1e-4)

    model.save_as_clipseg(str(tmp_path / "stock"))
    stock = CLIPSegForImageSegmentation.from_pretrained(tmp_path / "stock").eval()
    with torch.no_grad():
        paired = {key: value for key, value in inputs.items() if key != "image_index"}
        paired["pixel_values"] = inputs["pixel_values"][inputs["image_index"]]
        torch.testing.assert_close(stock(**paired).logits, with_adapter, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "last_blocks", "full"])
def test_resume_is_exact_in_every_mode(tmp_path, synthetic_data, tiny_clip_dir, mode):
    """4 steps straight against 2 steps, then a resumed run to 4: the same weights and adapter, bit for bit (a
    constant learning rate, so that the first run's shorter schedule is the same)."""
    common = (
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--decoder_dropout", "0.1",
        "--lr_scheduler_type", "constant", "--num_warmup_steps", "0", *MODES[mode],
    )  # fmt: skip
    if mode == "lora":
        common += ("--lora_dropout", "0.1")  # the adapters' dropout draws resume too
    straight = run_script(train_args(synthetic_data, tiny_clip_dir, tmp_path / "straight", *common))
    assert straight.returncode == 0, straight.stderr[-4000:]
    out = tmp_path / "resumed"
    first = run_script(train_args(synthetic_data, tiny_clip_dir, out, *common[2:], "--max_train_steps", "2"))
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoint = json.loads((out / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert checkpoint["tuning"].startswith(mode)
    resumed = run_script(
        train_args(synthetic_data, tiny_clip_dir, out, *common, "--resume_from_checkpoint", "latest")
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for name in ["model.safetensors"] + (
        ["clip_adapter/adapter_model.safetensors"] if mode == "lora" else []
    ):
        expected, got = load_file(tmp_path / "straight" / name), load_file(out / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"{name} differs after resuming"

    if mode == "lora":  # saved again merged: the earlier save's adapter must not stay to apply twice
        merged = run_script(
            train_args(synthetic_data, tiny_clip_dir, out, *common, "--resume_from_checkpoint", "latest",
                       "--merge_adapter")
        )  # fmt: skip
        assert merged.returncode == 0, merged.stderr[-4000:]
        assert not (out / "clip_adapter").exists()
        assert not any(
            name.startswith("clip_adapter")
            for name in json.loads((out / "run_files.json").read_text())["files"]
        )

    other = "full" if mode != "full" else "lora"
    refused = run_script(
        train_args(synthetic_data, tiny_clip_dir, out, *common[:4], *MODES[other], "--resume_from_checkpoint",
                   str(out / "checkpoints" / "step_2"), "--overwrite_output_dir")
    )  # fmt: skip
    assert refused.returncode == 2
    assert "was trained with --tune (and its flags)" in refused.stderr


@pytest.mark.slow
def test_two_processes_in_lora_mode_train_one_model(tmp_path, synthetic_data, tiny_clip_dir):
    """Two CPU processes with --tune lora: one run (num_processes 2), the same decoder and adapter on both,
    and the saved model, scored by one process, gives the run's evaluation."""
    out = tmp_path / "ddp"
    argv = train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "4", *MODES["lora"])
    result = run_script(argv, launcher=two_process_launcher(29571))
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert len(set(results["trained_checksum_per_process"])) == 1
    import run_eval

    alone = run_eval.main(
        ["--model", str(out), "--data_dir", str(synthetic_data), "--split", "validation", "--num_workers", "0",
         "--cache_dir", str(tmp_path / "hf_cache"), "--output_dir", str(tmp_path / "eval"), "--gallery_max", "0"]
    )  # fmt: skip
    scores = next(iter(alone.values()))["clipseg_paper_protocol"]
    for key in ("miou_0.3", "fgiou_0.3", "miou_best"):
        assert results[f"eval_{key}"] == pytest.approx(scores[key], abs=1e-6), key


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tune", "lora", "--lora_targets", "query"], "--lora_targets query: CLIP's layers have no such projection"),
        (["--lora_rank", "4"], "--lora_rank is for --tune lora (this run has --tune decoder)"),
        (["--unfreeze_last_blocks", "1"], "--unfreeze_last_blocks is for --tune last_blocks"),
        (["--tune", "last_blocks", "--unfreeze_last_blocks", "3"],
         "--unfreeze_last_blocks 3: the model runs 2 vision blocks (up to its last extracted layer, 1)"),
        (["--backbone_learning_rate", "1e-4"], "--backbone_learning_rate is for --tune lora, last_blocks or full"),
        (["--tune", "full", "--backbone_dtype", "bfloat16"], "--backbone_dtype bfloat16 keeps CLIP in that precision"),
    ],
)  # fmt: skip
def test_flags_that_do_not_fit_end_with_one_sentence(tmp_path, synthetic_data, tiny_clip_dir, extra, message):
    out = tmp_path / "out"
    result = run_script(train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "2", *extra))
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(error) == 1 and message in error[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert not (out / "model.safetensors").exists()


def test_decoder_mode_runs_no_autograd_through_clip(tiny_clip_dir):
    """--tune decoder is today's path: the towers' outputs carry no graph; with an adapter they do."""
    from types import SimpleNamespace

    from clipseg_tools import tuning

    model = ClipSegCustomModel.from_clip(str(tiny_clip_dir), image_size=64, extract_layers=[0, 1]).train()
    pixels = torch.randn(1, 3, 64, 64)
    assert not any(a.requires_grad for a in model.vision_activations(pixels))
    args = SimpleNamespace(
        tune="lora",
        lora_rank=2,
        lora_alpha=4.0,
        lora_dropout=0.0,
        lora_targets=["q_proj"],
        lora_towers=["vision"],
    )
    tuning.apply(model, args)
    activations = model.vision_activations(pixels)
    assert all(a.requires_grad for a in activations)
    assert not model.text_embeddings(torch.tensor([[1, 2, 3]])).requires_grad  # the text tower: not adapted
    names = {name for name, p in model.clip.named_parameters() if p.requires_grad}
    assert names and all(".layers.0." in n or ".layers.1." in n for n in names)  # only the blocks it runs


def test_the_model_file_needs_no_peft_unless_a_model_has_an_adapter():
    """transformers' remote-code loader requires every package the model file imports: peft must not be one
    (a model without an adapter, or a Space without peft, loads without it)."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports

    model_file = Path(__file__).resolve().parent.parent / "modeling_clipseg_custom.py"
    assert "peft" not in get_imports(str(model_file))
