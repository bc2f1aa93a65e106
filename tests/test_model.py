"""The model: CIDAS parity, backbone once per image, freezing, save/reload, bad input. All on tiny configs."""

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPSegConfig, CLIPSegForImageSegmentation

from clipseg_tools.tiny_clip import build_word_tokenizer
from configuration import ClipSegCustomConfig, refined_head_strides
from modeling_clipseg_custom import (
    ClipSegCustomModel,
    PatchConv2d,
    PatchTransposedConv2d,
    make_processor,
)

TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# Patch 16 is the only patch size at which transformers' refined head has the right size.
VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=16,
)
DECODER = dict(
    projection_dim=24,
    reduce_dim=16,
    extract_layers=[0, 1],
    decoder_num_attention_heads=4,
    decoder_intermediate_size=32,
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stock_clipseg(refined: bool, seed: int = 0) -> CLIPSegForImageSegmentation:
    torch.manual_seed(seed)
    config = CLIPSegConfig(
        text_config=TEXT, vision_config=VISION, use_complex_transposed_convolution=refined, **DECODER
    )
    model = CLIPSegForImageSegmentation(config).eval()
    with (
        torch.no_grad()
    ):  # transformers initialises decoder biases to zero; make them count in the comparison
        for param in model.decoder.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def tiny_config(**overrides) -> ClipSegCustomConfig:
    return ClipSegCustomConfig(text_config=TEXT, vision_config=VISION, **{**DECODER, **overrides})


def token_ids(rows: int, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (rows, length), generator=generator)
    ids[:, -1] = 1  # end of text
    return ids


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within float32 rounding: the patch embedding and the head run as matrix products here, as
    convolutions in transformers (the logits reach about 100 on these random weights)."""
    assert got.shape == expected.shape
    error = (got - expected).abs().max().item()
    assert error <= 1e-5 * max(1.0, expected.abs().max().item()), error


@pytest.mark.parametrize("refined", [True, False])
def test_cidas_checkpoint_loads_with_equal_logits_and_exports_back(tmp_path, pixels, refined):
    stock = stock_clipseg(refined)
    stock.save_pretrained(tmp_path / "cidas")
    ours = ClipSegCustomModel.from_pretrained(tmp_path / "cidas").eval()
    assert ours.config.model_type == "clipseg_custom"
    assert ours.config.use_complex_transposed_convolution is refined

    ids = token_ids(3)
    prompts = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    embeddings = torch.randn(3, DECODER["projection_dim"], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for inputs in (
            dict(input_ids=ids),
            dict(conditional_pixel_values=prompts),
            dict(conditional_embeddings=embeddings),
        ):
            expected = stock(pixel_values=pixels, **inputs).logits
            got = ours(pixel_values=pixels, **inputs).logits
            assert got.shape == expected.shape == (3, 64, 64)
            assert_same_logits(got, expected)

    ours.save_as_clipseg(tmp_path / "exported")
    reloaded = CLIPSegForImageSegmentation.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        expected = ours(pixel_values=pixels, input_ids=ids).logits
        got = reloaded(pixel_values=pixels, input_ids=ids).logits
    assert_same_logits(got, expected)


def test_trainable_parameters_match_transformers_decoder():
    for refined, reduce_dim in ((True, 64), (False, 64), (False, 16)):
        with torch.device("meta"):
            ours = ClipSegCustomModel(
                ClipSegCustomConfig(use_complex_transposed_convolution=refined, reduce_dim=reduce_dim)
            )
            stock = CLIPSegForImageSegmentation(ours.config.to_clipseg_config())
        trainable = ours.num_parameters(only_trainable=True)
        assert trainable == sum(p.numel() for p in stock.decoder.parameters())
        if refined:
            assert trainable == 1_127_009  # CIDAS/clipseg-rd64-refined
        assert sorted(ours.state_dict()) == sorted(stock.state_dict())


def test_one_image_with_k_prompts_equals_repeated_image(pixels):
    model = ClipSegCustomModel(tiny_config()).eval()
    ids = token_ids(4)
    image = pixels[:1]
    with torch.no_grad():
        shared = model(pixel_values=image, input_ids=ids, image_index=torch.zeros(4, dtype=torch.long)).logits
        repeated = model(pixel_values=image.repeat(4, 1, 1, 1), input_ids=ids).logits
        mixed = model(pixel_values=pixels, input_ids=ids, image_index=torch.tensor([2, 0, 2, 1])).logits
        one_by_one = torch.cat(
            [model(pixel_values=pixels[[i]], input_ids=ids[[p]]).logits for p, i in enumerate([2, 0, 2, 1])]
        )
    assert (shared - repeated).abs().max().item() < 1e-5
    assert (mixed - one_by_one).abs().max().item() < 1e-5


def test_stopping_the_vision_tower_early_changes_nothing(pixels):
    model = ClipSegCustomModel(tiny_config(extract_layers=[0, 1])).eval()
    vision = model.clip.vision_model
    with torch.no_grad():
        full = vision(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        assert len(full.hidden_states) == VISION["num_hidden_layers"] + 1  # the full tower ran 3 blocks
        early = model.vision_activations(pixels)
        for got, layer in zip(early, model.config.extract_layers):
            assert torch.equal(got, full.hidden_states[layer + 1])
        embeddings = torch.randn(3, DECODER["projection_dim"])
        grid = (4, 4)
        from_full = model.decoder([full.hidden_states[i + 1] for i in (0, 1)], embeddings, None, grid)
        from_early = model.decoder(early, embeddings, None, grid)
    assert torch.equal(from_full, from_early)


def test_backbone_frozen_after_every_load_path(tmp_path):
    model = ClipSegCustomModel(tiny_config())
    assert not any(p.requires_grad for p in model.clip.parameters())
    model.save_pretrained(tmp_path / "ours")
    stock_clipseg(True).save_pretrained(tmp_path / "cidas")
    clip = CLIPModel(model.config.clip_config())
    clip.save_pretrained(tmp_path / "clip")

    loaded = [
        ClipSegCustomModel.from_pretrained(tmp_path / "ours"),
        ClipSegCustomModel.from_pretrained(tmp_path / "cidas"),
        ClipSegCustomModel.from_clip(str(tmp_path / "clip"), reduce_dim=16, extract_layers=[0, 1]),
    ]
    for candidate in loaded:
        trainable = {name for name, p in candidate.named_parameters() if p.requires_grad}
        assert trainable and all(name.startswith("decoder.") for name in trainable)
        optimizer = torch.optim.AdamW(p for p in candidate.parameters() if p.requires_grad)
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert optimized == {id(p) for p in candidate.decoder.parameters()}
        candidate.train()
        assert candidate.decoder.training and not candidate.clip.training

    from_clip = loaded[2]
    for key, value in clip.state_dict().items():
        assert torch.equal(from_clip.clip.state_dict()[key], value)


def test_training_step_updates_only_the_decoder(pixels):
    model = ClipSegCustomModel(tiny_config())
    model.train()
    before_clip = {k: v.clone() for k, v in model.clip.state_dict().items()}
    before_decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = (torch.rand(3, 64, 64) > 0.5).float()
    loss = model(pixel_values=pixels, input_ids=token_ids(3), labels=labels).loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, model.clip.state_dict()[k]) for k, v in before_clip.items())
    assert any(not torch.equal(v, model.decoder.state_dict()[k]) for k, v in before_decoder.items())


def test_dropout_only_in_training(pixels):
    model = ClipSegCustomModel(tiny_config(decoder_dropout=0.5))
    ids = token_ids(3)
    model.train()
    with torch.no_grad():
        first, second = (model(pixel_values=pixels, input_ids=ids).logits for _ in range(2))
        assert not torch.equal(first, second)
        model.eval()
        first, second = (model(pixel_values=pixels, input_ids=ids).logits for _ in range(2))
    assert torch.equal(first, second)


def test_text_visual_mix_interpolates_embeddings(pixels):
    model = ClipSegCustomModel(tiny_config()).eval()
    ids = token_ids(3)
    examples = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text = model(pixel_values=pixels, input_ids=ids).conditional_embeddings
        image = model(pixel_values=pixels, conditional_pixel_values=examples).conditional_embeddings
        weight = torch.tensor([0.0, 0.3, 1.0])
        mixed = model(
            pixel_values=pixels, input_ids=ids, conditional_pixel_values=examples, text_weight=weight
        )
    expected = weight[:, None] * text + (1 - weight[:, None]) * image
    assert torch.allclose(mixed.conditional_embeddings, expected, atol=1e-6)


def test_over_long_phrases_are_truncated_keeping_the_end_token(pixels):
    model = ClipSegCustomModel(tiny_config()).eval()
    limit = TEXT["max_position_embeddings"]
    long_ids = token_ids(3, length=limit + 9)
    expected_ids = long_ids[:, :limit].clone()
    expected_ids[:, -1] = 1
    with torch.no_grad():
        got = model(pixel_values=pixels, input_ids=long_ids).logits
        expected = model(pixel_values=pixels, input_ids=expected_ids).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("patch", [8, 16, 32])
def test_refined_head_upsamples_by_the_patch_size_for_any_patch(patch):
    first, second = refined_head_strides(patch)
    assert first * second == patch
    vision = {**VISION, "patch_size": patch, "image_size": 2 * patch}
    model = ClipSegCustomModel(
        ClipSegCustomConfig(text_config=TEXT, vision_config=vision, image_size=4 * patch, **DECODER)
    )
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(2, 3, 4 * patch, 3 * patch), input_ids=token_ids(2)).logits
    assert logits.shape == (2, 4 * patch, 3 * patch)  # non-square inputs too


@pytest.mark.parametrize("patch", [8, 32])
def test_a_stock_refined_checkpoint_of_another_patch_size_gives_its_own_logits(tmp_path, patch):
    """transformers' refined head has strides patch_size // 4 twice (upsampling 64x for patch 32, as its default
    ViT-B/32 vision config has): imported, the model keeps that geometry and gives the stock logits; a new
    model of that patch size gets a head that upsamples by the patch size."""
    torch.manual_seed(0)
    vision = {**VISION, "patch_size": patch, "image_size": 2 * patch}
    config = CLIPSegConfig(
        text_config=TEXT, vision_config=vision, use_complex_transposed_convolution=True, **DECODER
    )
    stock = CLIPSegForImageSegmentation(config).eval()
    stock.save_pretrained(tmp_path / "stock")
    ours = ClipSegCustomModel.from_pretrained(tmp_path / "stock").eval()
    assert ours.config.refined_head_strides == [patch // 4, patch // 4]
    pixels = torch.randn(2, 3, 2 * patch, 2 * patch, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = stock(pixel_values=pixels, input_ids=token_ids(2)).logits
        got = ours(pixel_values=pixels, input_ids=token_ids(2)).logits
    assert_same_logits(got, expected)
    assert got.shape[-1] == 2 * (patch // 4) ** 2  # not the input's size: the stock geometry, kept
    ours.save_as_clipseg(tmp_path / "back")  # and it goes back to a stock checkpoint
    new = ClipSegCustomModel(
        ClipSegCustomConfig(text_config=TEXT, vision_config=vision, image_size=2 * patch, **DECODER)
    )
    assert new.config.refined_head_strides == list(refined_head_strides(patch))


def test_patch_size_other_than_16_refined_cannot_go_to_stock_transformers():
    config = ClipSegCustomConfig(
        text_config=TEXT, vision_config={**VISION, "patch_size": 8}, image_size=64, **DECODER
    )
    with pytest.raises(ValueError, match="only fits patch size 16"):
        config.to_clipseg_config()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(extract_layers=[0, 3]), "reach beyond the vision tower"),
        (dict(extract_layers=[1, 0]), "strictly increasing"),
        (dict(extract_layers=[]), "extract_layers is empty"),
        (dict(decoder_num_attention_heads=5), "does not divide reduce_dim"),
        (dict(conditional_layer=2), "conditional_layer 2"),
        (dict(decoder_dropout=1.0), "decoder_dropout"),
        (dict(image_size=40), "multiple of the patch size"),
    ],
)
def test_bad_configs_are_rejected_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_bad_inputs_raise_clear_errors(pixels):
    model = ClipSegCustomModel(tiny_config()).eval()
    ids = token_ids(3)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(pixel_values=pixels[:, :2], input_ids=ids)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(pixel_values=pixels[:, :, :60], input_ids=ids)
    with pytest.raises(ValueError, match="pass image_index"):
        model(pixel_values=pixels[:2], input_ids=ids)
    with pytest.raises(ValueError, match="one entry per prompt"):
        model(pixel_values=pixels, input_ids=ids, image_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
        model(pixel_values=pixels, input_ids=ids, image_index=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="prompt list is empty"):
        model(pixel_values=pixels, input_ids=ids[:0], image_index=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="give a prompt"):
        model(pixel_values=pixels)
    with pytest.raises(ValueError, match="labels have shape"):
        model(pixel_values=pixels, input_ids=ids, labels=torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="every image needs at least one prompt"):
        model.predict(Image.new("RGB", (20, 10)), [], processor=object())


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    words = ["red", "green", "blue", "circle", "square", "a", "photo", "of"]
    tokenizer = build_word_tokenizer(words, tmp_path_factory.mktemp("tok"), max_length=16)
    return make_processor(tokenizer, image_size=64)


def tiny_model_for(processor) -> ClipSegCustomModel:
    text = {**TEXT, "vocab_size": len(processor.tokenizer)}
    text.update(bos_token_id=processor.tokenizer.bos_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    text["pad_token_id"] = processor.tokenizer.pad_token_id
    return ClipSegCustomModel(
        ClipSegCustomConfig(text_config=text, vision_config=VISION, image_size=64, **DECODER)
    ).eval()


def test_predict_gives_maps_at_original_size_for_any_input(processor):
    model = tiny_model_for(processor)
    rgba = Image.new("RGBA", (50, 30), (255, 0, 0, 128))
    gray = np.random.default_rng(0).integers(0, 255, (41, 23), dtype=np.uint8)
    floats = np.random.default_rng(1).random((17, 29, 3))
    maps = model.predict(
        [rgba, gray, floats],
        [["red circle", "blue square"], "green", [Image.new("L", (12, 12))]],
        processor=processor,
    )
    assert [tuple(m.shape) for m in maps] == [(2, 30, 50), (1, 41, 23), (1, 17, 29)]
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in maps)

    # The same maps as the forward pass on the processor's inputs, resized.
    inputs = processor(text=["red circle"], images=[rgba.convert("RGB")], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        ).logits
    expected = torch.sigmoid(
        torch.nn.functional.interpolate(logits[:, None], size=(30, 50), mode="bilinear")[:, 0]
    )
    assert torch.allclose(maps[0][:1], expected, atol=1e-5)

    long_phrase = " ".join(["red circle"] * 40)  # far beyond the 16-token text tower
    assert model.predict(rgba, long_phrase, processor=processor)[0].shape == (1, 30, 50)


def test_save_and_reload_in_a_fresh_offline_process(tmp_path, processor):
    model = tiny_model_for(processor)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    saved = sorted(os.listdir(tmp_path / "model"))
    assert {"config.json", "model.safetensors", "configuration.py", "modeling_clipseg_custom.py"} <= set(
        saved
    )
    auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_clipseg_custom.ClipSegCustomModel"
    assert auto_map["AutoConfig"] == "configuration.ClipSegCustomConfig"
    assert "AutoModelForImageSegmentation" in auto_map

    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    expected = model.predict(image, ["red circle", "blue"], processor=processor)[0]
    torch.save(expected, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import builtins
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageSegmentation, AutoProcessor
        def asked(prompt=""):  # transformers' trust_remote_code question; no one is there to answer
            print("ASKED", prompt)
            raise EOFError
        builtins.input = asked
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert not any(p.requires_grad for p in model.clip.parameters())
        seg = AutoModelForImageSegmentation.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(tmp_path / "model")!r})
        maps = model.predict(Image.open({str(tmp_path / "image.png")!r}), ["red circle", "blue"], processor=processor)[0]
        default = model.predict(Image.open({str(tmp_path / "image.png")!r}), ["red circle", "blue"])[0]
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(maps, expected) and torch.equal(default, expected), (maps - expected).abs().max()
        print("reloaded", type(processor).__name__, type(seg).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    # Run outside the repository so that nothing of the project is importable: only the saved folder counts.
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded CLIPSegProcessor ClipSegCustomModel" in result.stdout
    # The processor came from the folder without a question or a wrong-model-type warning.
    assert "ASKED" not in result.stdout and "to instantiate a model of type" not in result.stderr


def test_bfloat16_backbone_gives_the_float32_logits_within_bf16_rounding(pixels):
    torch.manual_seed(0)
    model = ClipSegCustomModel(tiny_config(decoder_dropout=0.0)).eval()
    ids = token_ids(3)
    with torch.no_grad():
        reference = model(pixel_values=pixels, input_ids=ids).logits
        model.cast_backbone(torch.bfloat16)
        plain = model(pixel_values=pixels, input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(pixel_values=pixels, input_ids=ids).logits.float()
    assert model.backbone_dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.decoder.parameters())  # float32 master weights
    for logits in (plain, autocast):
        relative = float((logits - reference).norm() / reference.norm())
        assert 0 < relative < 2e-2, relative  # bf16 rounding: not equal, and close

    model.train()
    loss = model(pixel_values=pixels, input_ids=ids, labels=torch.rand(3, 64, 64)).loss
    loss.backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.decoder.parameters())


@pytest.mark.parametrize(
    "in_channels, out_channels, stride", [(64, 32, 4), (32, 1, 4), (16, 1, 16), (5, 3, 2)]
)
def test_patch_layers_equal_the_convolutions_they_replace(in_channels, out_channels, stride):
    """Forward and every gradient of the matrix-product layers against PyTorch's convolutions."""
    torch.manual_seed(0)
    up = PatchTransposedConv2d(in_channels, out_channels, stride)
    grid = torch.randn(3, in_channels, 5, 7, requires_grad=True)
    reference = torch.nn.functional.conv_transpose2d(grid, up.weight, up.bias, stride=stride)
    down = PatchConv2d.like(torch.nn.Conv2d(out_channels, in_channels, stride, stride))
    image = torch.randn(2, out_channels, 5 * stride, 7 * stride, requires_grad=True)
    for got, expected, inputs in (
        (up(grid), reference, (grid, up.weight, up.bias)),
        (
            down(image),
            torch.nn.functional.conv2d(image, down.weight, down.bias, stride=stride),
            (image, down.weight, down.bias),
        ),
    ):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        upstream = torch.randn_like(got)
        for ours, theirs in zip(
            torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)
        ):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a patch embedding"):
        PatchConv2d.like(torch.nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1))


def test_compiled_model_gives_the_same_logits_and_gradients(pixels):
    torch.manual_seed(0)
    model = ClipSegCustomModel(tiny_config(decoder_dropout=0.0)).eval()
    ids = token_ids(3)
    labels = torch.rand(3, 64, 64)
    with torch.no_grad():
        reference = model(pixel_values=pixels, input_ids=ids).logits
    reference_grads = decoder_gradients(model, pixels, ids, labels)
    # The eager backend traces exactly what a real backend compiles, without a C++ toolchain.
    model.compile_backbone(backend="eager").compile_decoder(backend="eager")
    with torch.no_grad():
        compiled = model(pixel_values=pixels, input_ids=ids).logits
    assert torch.equal(compiled, reference)
    for got, expected in zip(decoder_gradients(model, pixels, ids, labels), reference_grads):
        assert torch.equal(got, expected)
    assert "_vision_blocks" not in "".join(model.state_dict())  # nothing new in the weights

    # A copy (and an unpickled model) runs its own modules, compiled again, not the original's.
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone._vision_blocks is not model._vision_blocks and clone._decode is not model._decode
        with torch.no_grad():
            for param in clone.parameters():
                param.zero_()
            changed = clone(pixel_values=pixels, input_ids=ids).logits
        assert not torch.allclose(changed, reference)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels, input_ids=ids).logits, reference)


def decoder_gradients(model, pixels, ids, labels) -> list[torch.Tensor]:
    model.train()
    model(pixel_values=pixels, input_ids=ids, labels=labels).loss.backward()
    grads = [p.grad.clone() for p in model.decoder.parameters()]
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads


def test_cuda_graph_mode_hands_out_copies():
    """Compile mode reduce-overhead wraps the compiled decoder so that its outputs are copies: a CUDA graph's
    next replay reuses its output memory. (Graphs need a GPU; the copying is checked here.)"""
    from modeling_clipseg_custom import copied_outputs

    kept = [torch.zeros(2)]

    def graphed(x):
        kept[0].copy_(x)
        return [kept[0], (kept[0], None)]

    out = copied_outputs(graphed)(torch.ones(2))
    graphed(torch.full((2,), 5.0))  # the "next replay" overwrites the graph's own output
    assert torch.equal(out[0], torch.ones(2)) and torch.equal(out[1][0], torch.ones(2)) and out[1][1] is None


def test_a_model_with_a_cast_backbone_is_not_saved_half_cast(tmp_path):
    model = ClipSegCustomModel(tiny_config()).cast_backbone(torch.bfloat16)
    with pytest.raises(ValueError, match="cast_backbone"):
        model.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())


def test_graphed_towers_fall_back_to_the_compiled_towers_off_a_gpu(pixels):
    """Compile mode reduce-overhead gives the towers the project's own CUDA graph (tests/test_gpu.py); on a CPU
    the compiled towers run as they are, with the same logits, and copies compile again."""
    torch.manual_seed(0)
    model = ClipSegCustomModel(tiny_config(decoder_dropout=0.0)).eval()
    ids = token_ids(3)
    with torch.no_grad():
        reference = model(pixel_values=pixels, input_ids=ids).logits
    model.compile_backbone(backend="eager", mode="reduce-overhead")
    assert model._tower_graph is not None and not model._graphs_towers(pixels)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels, input_ids=ids).logits, reference)
        activations, embeddings = model.tower_features(pixels, ids)
    assert torch.equal(embeddings, model.text_embeddings(ids))
    assert all(torch.equal(a, b) for a, b in zip(activations, model.vision_activations(pixels)))
    clone = copy.deepcopy(model)
    assert clone._tower_graph is not model._tower_graph and clone._tower_graph.model is clone


def test_tower_graph_past_its_shape_limit_runs_the_towers_without_a_graph(pixels):
    """Each captured shape keeps its buffers; past `max_graphs` shapes the towers run as compiled, uncaptured
    (the same results as apart; nothing captured, so this path also runs on a CPU)."""
    from modeling_clipseg_custom import TowerGraph

    model = ClipSegCustomModel(tiny_config()).eval()
    ids = token_ids(3)
    graph = TowerGraph(model, max_graphs=0)
    activations, embeddings = graph(pixels, ids, None)
    assert not graph.graphs
    assert torch.equal(embeddings, model.text_embeddings(ids))
    assert all(torch.equal(a, b) for a, b in zip(activations, model.vision_activations(pixels)))
