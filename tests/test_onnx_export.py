"""The ONNX export (`python -m clipseg_tools.onnx_export`) and its onnxruntime runner, on tiny models: the graphs
give PyTorch's logits at other image, prompt and token counts than they were traced with, the int8 graphs
PyTorch's masks on most pixels, `OnnxClipSeg.predict` the maps of `ClipSegCustomModel.predict` in a process
that cannot import torch; bad input ends with one sentence and leaves no folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from clipseg_tools import onnx_export, onnx_runtime
from clipseg_tools.onnx_export import main
from clipseg_tools.onnx_runtime import OnnxClipSeg
from clipseg_tools.tiny_clip import tiny_clip_configs
from configuration import ClipSegCustomConfig
from modeling_clipseg_custom import ClipSegCustomModel, make_processor

REPO_ROOT = Path(__file__).resolve().parent.parent
PHRASES = ["red circle", "a blue square", "green"]
SIZES = [(50, 30), (41, 64)]  # (width, height)
# Models: the refined head at patch 16, the plain head at patch 16, the refined head at patch 8.
VARIANTS = {"refined-16": (True, 16), "plain-16": (False, 16), "refined-8": (True, 8)}
THRESHOLD = 0.3


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def tiny_model(tokenizer, refined: bool, patch: int) -> ClipSegCustomModel:
    torch.manual_seed(patch + refined)
    configs = tiny_clip_configs(
        tokenizer, width=32, layers=3, heads=4, patch_size=patch, pretrain_image_size=32, max_positions=16
    )
    config = ClipSegCustomConfig(
        **configs,
        image_size=64,
        reduce_dim=16,
        extract_layers=[0, 1],
        decoder_intermediate_size=32,
        use_complex_transposed_convolution=refined,
    )
    model = ClipSegCustomModel(config).eval()
    head = model.decoder.transposed_convolution
    with torch.no_grad():  # logits around the threshold: masks with both values
        (head[-1] if refined else head).bias.fill_(-0.85)
    return model


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_clip_dir) -> dict[str, tuple[ClipSegCustomModel, Path]]:
    """Each variant's tiny model, saved with its processor."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    saved = {}
    for name, (refined, patch) in VARIANTS.items():
        model = tiny_model(tokenizer, refined, patch)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        make_processor(tokenizer, image_size=64).save_pretrained(folder)
        saved[name] = model, folder
    return saved


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, saved_models, tmp_path_factory):
    """A variant's model, its processor, and its export by the command (fp32 and int8)."""
    model, folder = saved_models[request.param]
    output = tmp_path_factory.mktemp("exports") / request.param
    assert main(["--model", str(folder), "--output", str(output)]) == 0
    return model, AutoProcessor.from_pretrained(folder), output


def model_inputs(processor) -> dict[str, torch.Tensor]:
    """I=2 images, P=3 prompts, T=12 tokens (the export traced 2 images, 3 prompts of fewer tokens)."""
    tokens = processor.tokenizer(PHRASES, padding="max_length", max_length=12, return_tensors="pt")
    return {
        "pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "image_index": torch.tensor([1, 0, 1]),
    }


def pytorch_and_onnx_logits(exported, precision: str) -> tuple[np.ndarray, np.ndarray]:
    model, processor, folder = exported
    inputs = model_inputs(processor)
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    got = OnnxClipSeg(folder, precision).logits(*(tensor.numpy() for tensor in inputs.values()))
    return got, expected


def test_folder_holds_the_graphs_processor_and_settings(exported):
    _, _, folder = exported
    names = {path.name for path in folder.iterdir()}
    parts = ("vision", "text", "image_prompt", "decoder")
    graphs = {f"{part}{suffix}.onnx" for part in parts for suffix in ("", "_int8")}
    assert graphs <= names and "tokenizer_config.json" in names
    settings = json.loads((folder / "onnx_config.json").read_text())
    assert settings["image_size"] == 64 and settings["max_text_length"] == 16
    assert settings["relative_difference"]["logits"]["fp32"] < 1e-4
    assert settings["relative_difference"]["image_prompt_embeddings"]["fp32"] < 1e-4
    assert not any(name.startswith(".") for name in names)


def test_fp32_logits_equal_pytorch_at_other_counts(exported):
    got, expected = pytorch_and_onnx_logits(exported, "fp32")
    assert got.shape == expected.shape == (3, 64, 64)
    assert relative_difference(got, expected) < 1e-4


def test_int8_masks_agree_with_pytorch(exported):
    got, expected = pytorch_and_onnx_logits(exported, "int8")
    threshold = np.log(THRESHOLD / (1 - THRESHOLD))  # probability 0.3 as a logit
    got_mask, expected_mask = got > threshold, expected > threshold
    assert 0.05 < expected_mask.mean() < 0.95  # both values, so that the agreement means something
    assert iou(got_mask, expected_mask) > 0.9
    assert (got_mask == expected_mask).mean() > 0.95


def test_predict_without_torch_equals_pytorch_predict(exported, tmp_path):
    """`OnnxClipSeg.predict` in a process where torch cannot be imported (as on a machine without it)."""
    model, processor, folder = exported
    rng = np.random.default_rng(0)
    paths = []
    for k, (width, height) in enumerate(SIZES):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    prompts = [PHRASES, PHRASES[1:]]
    code = (
        "import sys, numpy as np\n"
        "sys.modules['torch'] = sys.modules['torchvision'] = None  # any import of torch fails\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from clipseg_tools.onnx_runtime import OnnxClipSeg\n"
        f"maps = OnnxClipSeg({str(folder)!r}).predict({[str(p) for p in paths]!r}, {prompts!r})\n"
        f"np.savez({str(tmp_path / 'maps.npz')!r}, *maps)\n"
        "assert sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=300)
    with np.load(tmp_path / "maps.npz") as saved:
        got = [saved[f"arr_{k}"] for k in range(len(paths))]
    expected = model.predict([Image.open(path) for path in paths], prompts, processor)
    for onnx_maps, torch_maps, (width, height), phrases in zip(got, expected, SIZES, prompts):
        assert onnx_maps.shape == tuple(torch_maps.shape) == (len(phrases), height, width)
        assert np.abs(onnx_maps - torch_maps.numpy()).max() < 1e-5


def test_refuses_a_folder_that_holds_files(saved_models, tmp_path, capsys):
    model_folder = saved_models["refined-16"][1]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as ended:
        main(["--model", str(model_folder), "--output", str(tmp_path)])
    assert ended.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "already holds files" in message
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_failed_export_leaves_no_folder(saved_models, tmp_path, monkeypatch):
    def fail(folder: Path) -> dict:
        raise RuntimeError("quantisation failed")

    monkeypatch.setitem(onnx_export.QUANTIZERS, "int8", fail)
    with pytest.raises(RuntimeError, match="quantisation failed"):
        main(["--model", str(saved_models["refined-16"][1]), "--output", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_fp16_graphs_at_another_opset(saved_models, tmp_path):
    model, folder = saved_models["refined-16"]
    output = tmp_path / "onnx"
    assert main(["--model", str(folder), "--output", str(output), "--opset", "18", "--quantize", "fp16"]) == 0
    assert not (output / "vision_int8.onnx").exists()
    exported = model, AutoProcessor.from_pretrained(folder), output
    got, expected = pytorch_and_onnx_logits(exported, "fp16")
    assert relative_difference(got, expected) < 5e-3
    assert iou(got > 0, expected > 0) > 0.97


def random_images(count: int, seed: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for width, height in SIZES
    ][:count]


def test_example_image_prompts_give_pytorch_maps(exported):
    """An example image, a phrase and a second example image for one image: the image_prompt graph embeds
    the examples as the model's vision tower does."""
    model, processor, folder = exported
    photo, example = random_images(2)
    prompts = [example, "red circle", example.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    expected = model.predict(photo, prompts, processor)[0].numpy()
    got = OnnxClipSeg(folder).predict(photo, prompts)[0]
    assert got.shape == expected.shape == (3, photo.height, photo.width)
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the example's map is not the phrase's


def test_segmenter_gives_the_pipelines_masks(exported):
    """`OnnxSegmenter` (onnxruntime) against the project's pipeline on the same model: labels, scores and
    masks, binary, probabilities and multi-class."""
    from pipeline_clipseg import TASK, ClipSegSegmentationPipeline

    model, processor, folder = exported
    images = random_images(2, seed=3)
    pipe = ClipSegSegmentationPipeline(model=model, processor=processor, task=TASK)
    onnx = onnx_runtime.OnnxSegmenter(folder)
    for options in ({}, {"threshold": None}, {"multiclass": True}):
        expected = pipe(images, prompts=PHRASES, **options)
        got = onnx(
            (image for image in images), prompts=PHRASES, **options
        )  # a generator, as the pipeline takes
        for got_image, expected_image in zip(got, expected, strict=True):
            for g, e in zip(got_image, expected_image, strict=True):
                assert g["label"] == e["label"]
                assert abs(g["score"] - e["score"]) < 1e-5
                difference = np.abs(np.asarray(g["mask"], dtype=int) - np.asarray(e["mask"], dtype=int))
                assert (
                    difference.max() <= 1
                    if options.get("threshold", 0.3) is None
                    else difference.mean() < 1e-3
                )


def test_onnx_folder_finds_the_graphs_of_a_model_folder(exported, tmp_path):
    _, _, folder = exported
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    (model_folder / "onnx").symlink_to(folder)
    assert onnx_runtime.onnx_folder(model_folder) == model_folder / "onnx"
    assert onnx_runtime.onnx_folder(folder) == folder
    with pytest.raises(ValueError, match="holds no exported graphs"):
        onnx_runtime.onnx_folder(tmp_path)


@pytest.mark.parametrize("variant", ["plain-16", "refined-8"])  # refined-8: a head stock CLIPSeg cannot build
def test_transformers_js_layout_runs_as_transformers_js_feeds_it(saved_models, tmp_path, variant):
    """`--target transformers.js`: onnx/model.onnx and model_quantized.onnx, fed by input name with one
    image for all phrases and with images paired to phrases, give PyTorch's logits; config.json is a stock
    CLIPSeg config; a failed check leaves no folder."""
    import onnxruntime as ort
    from transformers import AutoConfig

    model, model_folder = saved_models[variant]
    output = tmp_path / "web"
    assert main(["--model", str(model_folder), "--output", str(output), "--target", "transformers.js"]) == 0
    names = {path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file()}
    assert {"onnx/model.onnx", "onnx/model_quantized.onnx", "config.json", "README.md"} <= names
    assert {"preprocessor_config.json", "tokenizer_config.json"} <= names
    assert AutoConfig.from_pretrained(output).model_type == "clipseg"
    processor = AutoProcessor.from_pretrained(output)
    assert processor.image_processor.size == {"height": 64, "width": 64}
    tokens = processor.tokenizer(PHRASES, padding=True, return_tensors="np")
    pixels = processor.image_processor(random_images(2), return_tensors="np")["pixel_values"]
    for file, bound in (("model.onnx", 1e-4), ("model_quantized.onnx", None)):
        session = ort.InferenceSession(str(output / "onnx" / file), providers=["CPUExecutionProvider"])
        assert {i.name for i in session.get_inputs()} == {"input_ids", "attention_mask", "pixel_values"}
        for images, image_index in ((pixels[:1], [0, 0, 0]), (pixels[[0, 1, 0]], [0, 1, 2])):
            feeds = {**tokens, "pixel_values": images}
            got = session.run(["logits"], feeds)[0]
            with torch.no_grad():
                expected = model(
                    **{k: torch.from_numpy(v) for k, v in feeds.items()},
                    image_index=torch.tensor(image_index),
                ).logits.numpy()
            assert got.shape == (3, 64, 64)
            if bound:
                assert relative_difference(got, expected) < bound
            else:
                assert iou(got > 0, expected > 0) > 0.9


def test_a_cidas_format_checkpoint_at_another_image_size_exports(tiny_clip_dir, tmp_path):
    """A stock `CLIPSegForImageSegmentation` folder (the CIDAS checkpoints' format) of a model at 96 px
    exports through the same command; its graphs give the model's logits at 96 px."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    torch.manual_seed(3)
    configs = tiny_clip_configs(tokenizer, width=32, layers=3, heads=4, patch_size=16, pretrain_image_size=32)
    model = ClipSegCustomModel(
        ClipSegCustomConfig(**configs, image_size=96, reduce_dim=16, extract_layers=[1, 2])
    ).eval()
    stock = tmp_path / "stock"
    model.save_as_clipseg(str(stock), processor=make_processor(tokenizer, image_size=96))
    assert json.loads((stock / "config.json").read_text())["model_type"] == "clipseg"
    output = tmp_path / "onnx"
    assert main(["--model", str(stock), "--output", str(output), "--quantize", "none"]) == 0
    settings = json.loads((output / "onnx_config.json").read_text())
    assert settings["image_size"] == 96 and list(settings["graphs"]) == ["fp32"]
    inputs = model_inputs(AutoProcessor.from_pretrained(stock))
    inputs["pixel_values"] = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    got = OnnxClipSeg(output).logits(*(tensor.numpy() for tensor in inputs.values()))
    assert got.shape == (3, 96, 96) and relative_difference(got, expected) < 1e-4


def test_a_model_the_exporter_cannot_trace_is_refused_in_one_sentence(
    saved_models, tmp_path, monkeypatch, capsys
):
    def unsupported(*args, **kwargs):
        raise torch.onnx.errors.OnnxExporterError("Unsupported: ONNX export of operator foo\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    model_folder = saved_models["plain-16"][1]
    with pytest.raises(SystemExit) as ended:
        main(["--model", str(model_folder), "--output", str(tmp_path / "out")])
    assert ended.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message == (
        f"error: --model {model_folder} could not be exported to ONNX: Unsupported: ONNX export of operator foo"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_opset_the_runtime_lacks_is_refused_in_one_sentence(saved_models, tmp_path, monkeypatch, capsys):
    """onnxruntime refusing the written graphs (as an older runtime refuses a newer opset): one sentence that
    names the runtime and what to do, and no folder."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    def refuse(*args, **kwargs):
        raise state.Fail(
            "ONNX Runtime only *guarantees* support for models stamped with opset version 99\nmore"
        )

    monkeypatch.setattr(onnx_export, "OnnxClipSeg", refuse)
    with pytest.raises(SystemExit) as ended:
        main(
            ["--model", str(saved_models["plain-16"][1]), "--output", str(tmp_path / "out"), "--opset", "20"]
        )
    assert ended.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0
    assert f"onnxruntime {onnxruntime.__version__} cannot load the fp32 graphs" in message
    assert "export with another --opset, or install a newer onnxruntime" in message
    assert list(tmp_path.iterdir()) == []
