"""The predict command (`run_predict.py`, `clipseg-predict`) and `predict()`'s file and URL inputs, on a tiny
model: outputs equal `predict()`'s maps, reruns skip what is done, bad input ends with one sentence."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from clipseg_tools import predict_command
from clipseg_tools.predict_command import folder_names, main, slugify, unique_slugs
from modeling_clipseg_custom import ClipSegCustomModel, make_processor

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["red circle", "blue square"]
SIZES = {"a.png": (50, 30), "b.jpg": (41, 64), "c.png": (80, 72)}  # (width, height)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_clip_dir):
    """A tiny model of ours saved with its processor, with some foreground in its maps."""
    torch.manual_seed(7)
    model = ClipSegCustomModel.from_clip(
        str(tiny_clip_dir), image_size=64, reduce_dim=16, extract_layers=[0, 1], decoder_intermediate_size=32
    )
    with torch.no_grad():  # centre the logits near the threshold: masks with both values
        model.decoder.transposed_convolution[-1].bias.fill_(-0.85)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    make_processor(AutoTokenizer.from_pretrained(tiny_clip_dir), image_size=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoProcessor

    return ClipSegCustomModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def write_photos(folder: Path, sizes: dict[str, tuple[int, int]] = SIZES, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def predict_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--output_dir", str(out), "--device", "cpu", *extra]


def scores(out: Path) -> tuple[list[dict], dict]:
    with open(out / "scores.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return rows, json.loads((out / "scores.json").read_text())


def count_predict_calls(monkeypatch) -> list[int]:
    """predict() still runs; each call's number of images is recorded."""
    calls = []
    original = ClipSegCustomModel.predict

    def counted(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(ClipSegCustomModel, "predict", counted)
    return calls


def test_a_folder_gives_predicts_maps_and_names_the_broken_file(tmp_path, model_dir, loaded, caplog):
    photos = write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (tmp_path / "photos" / "notes.txt").write_text("not an image, not picked up")
    out = tmp_path / "out"
    argv = predict_args(model_dir, out, "--images", str(tmp_path / "photos"), "--prompts", *PROMPTS)
    assert main([*argv, "--save_probabilities", "--num_workers", "2"]) == 0

    model, processor = loaded
    images = [Image.open(path) for path in photos]
    expected = model.predict(
        images, [PROMPTS] * len(images), processor=processor
    )  # one batch, as the command
    rows, payload = scores(out)
    assert [(row["image"], row["prompt"]) for row in rows] == [(str(p), q) for p in photos for q in PROMPTS]
    for path, maps in zip(photos, expected):
        for prompt, probability in zip(PROMPTS, maps):
            slug = slugify(prompt)
            mask = np.asarray(Image.open(out / path.stem / f"{slug}.png"))
            assert Image.open(out / path.stem / f"{slug}.png").mode == "L"
            assert mask.shape == probability.shape == SIZES[path.name][::-1]
            assert set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask == 255, (probability > 0.3).numpy())
            saved = np.asarray(Image.open(out / path.stem / f"{slug}_probability.png"))
            assert np.array_equal(saved, (probability.double().numpy() * 65535).round().astype(np.uint16))
            overlay = Image.open(out / path.stem / f"{slug}_overlay.jpg")
            assert overlay.format == "JPEG" and overlay.size == SIZES[path.name]
            row = next(r for r in rows if r["image"] == str(path) and r["prompt"] == prompt)
            assert float(row["score"]) == float(probability.max())
            assert float(row["mask_area"]) == (probability > 0.3).numpy().mean()
            assert row["mask"] == f"{path.stem}/{slug}.png" and row["prompt_type"] == "text"
    assert [r["score"] for r in payload["rows"]] == [float(r["score"]) for r in rows]
    assert 0.05 < np.mean([float(r["mask_area"]) for r in rows]) < 0.95  # masks of both values
    assert "highest probability" in payload["columns"]

    broken = str(tmp_path / "photos" / "broken.jpg")
    assert [entry["image"] for entry in payload["skipped"]] == [broken]
    assert f"{broken} could not be read as an image" in caplog.text
    assert "3 images segmented, 1 skipped (did not decode): see the warnings above" in caplog.text


def test_a_glob_and_an_image_list_pick_their_images(tmp_path, model_dir):
    photos = write_photos(tmp_path / "photos")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "images.txt").write_text(f"# the JPEG only\n\n../photos/{photos[1].name}\n")
    out = tmp_path / "out"
    pattern = str(tmp_path / "photos" / "*.png")
    assert (
        main(predict_args(model_dir, out, "--images", pattern, "--prompts", "red", "--num_workers", "0")) == 0
    )
    assert [row["image"] for row in scores(out)[0]] == [str(photos[0]), str(photos[2])]

    listed = ["--image_list", str(tmp_path / "lists" / "images.txt"), "--prompts", "red"]
    assert main(predict_args(model_dir, tmp_path / "listed", *listed)) == 0
    assert [Path(row["image"]).name for row in scores(tmp_path / "listed")[0]] == ["b.jpg"]


def test_a_rerun_skips_done_images_and_redoes_damaged_ones(tmp_path, model_dir, monkeypatch, caplog):
    write_photos(tmp_path / "photos")
    out = tmp_path / "out"
    argv = predict_args(model_dir, out, "--images", str(tmp_path / "photos"), "--prompts", *PROMPTS)
    calls = count_predict_calls(monkeypatch)
    assert main(argv) == 0 and calls == [3]
    first = scores(out)
    mask = out / "a" / "red_circle.png"
    written = mask.stat().st_mtime_ns

    assert main(argv) == 0 and calls == [3]  # nothing predicted again
    assert mask.stat().st_mtime_ns == written and scores(out) == first  # the scores still cover all images
    assert "3 images segmented (3 of them in an earlier run)" in caplog.text

    # A file cut short under its final name, and one that a killed run left as its temporary file only.
    overlay = out / "c" / "blue_square_overlay.jpg"
    overlay.write_bytes(overlay.read_bytes()[: overlay.stat().st_size // 2])
    (out / "b" / "red_circle.png").rename(out / "b" / ".red_circle.png.partial")
    assert main(argv) == 0 and calls == [3, 2]
    Image.open(overlay).load()  # whole again
    assert (out / "b" / "red_circle.png").is_file() and scores(out) == first

    assert main([*argv, "--overwrite"]) == 0 and calls == [3, 2, 3]
    assert mask.stat().st_mtime_ns != written

    # Other settings, or another image under the same name, are not "done".
    assert main([*argv, "--threshold", "0.5"]) == 0 and calls == [3, 2, 3, 3]
    write_photos(tmp_path / "photos", {"a.png": (20, 20)}, seed=1)
    assert main([*argv, "--threshold", "0.5"]) == 0 and calls == [3, 2, 3, 3, 1]
    assert Image.open(mask).size == (20, 20)


def test_prompts_file_with_comments_and_example_image_prompts(tmp_path, model_dir, loaded):
    (photo,) = write_photos(tmp_path / "photos", {"a.png": (40, 30)})
    (example,) = write_photos(tmp_path / "examples", {"star.png": (24, 24)}, seed=3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\n\nred circle\n  Red circle!  \n# the end\n")
    out = tmp_path / "out"
    argv = ["--images", str(photo), "--prompts_file", str(prompts), "--example_images", str(example)]
    assert main(predict_args(model_dir, out, *argv)) == 0

    rows, payload = scores(out)
    assert [(r["prompt"], r["prompt_type"]) for r in rows] == [
        ("red circle", "text"),
        ("Red circle!", "text"),
        ("star", "image"),
    ]
    assert [p["slug"] for p in payload["prompts"]] == ["red_circle", "red_circle_2", "star"]
    model, processor = loaded
    maps = model.predict(Image.open(photo), ["red circle", "Red circle!", Image.open(example)], processor)[0]
    star = np.asarray(Image.open(out / "a" / "star.png")) == 255
    assert np.array_equal(star, (maps[2] > 0.3).numpy())
    assert float(rows[2]["score"]) == float(maps[2].max())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", "red", " "], "--prompts: prompt 2 is empty"),
        (["--images", "{tmp}/empty", "--prompts", "red"], "no image found in --images {tmp}/empty"),
        (["--images", "{tmp}/nowhere/*.jpg", "--prompts", "red"], "no image found in --images {tmp}/nowhere/*.jpg"),
        (["--images", "{tmp}/missing.jpg", "--prompts", "red"], "--images {tmp}/missing.jpg: no such file"),
        (["--images", "{tmp}/bad", "--prompts", "red"], "no image was segmented: the 1 image found did not decode"),
        (["--example_images", "{tmp}/bad/x.png"], "--example_images {tmp}/bad/x.png: {tmp}/bad/x.png could not be"),
        (["--model", "{tmp}/empty"], "--model {tmp}/empty: is not a model folder (no config.json)"),
        (["--model", "{tmp}/broken_model"], "--model {tmp}/broken_model could not be loaded as a CLIPSeg model"),
    ],
)  # fmt: skip
def test_bad_input_ends_with_one_sentence_and_exit_code_2(tmp_path, model_dir, capsys, extra, message):
    for folder in ("empty", "bad", "broken_model"):
        (tmp_path / folder).mkdir()
    (tmp_path / "bad" / "x.png").write_text("no PNG")
    (tmp_path / "broken_model" / "config.json").write_text("{}")  # passes the early check, fails to load
    write_photos(tmp_path / "photos", {"a.png": (20, 20)})
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    argv = predict_args(model_dir, tmp_path / "out", "--images", str(tmp_path / "photos"), "--prompts", "red")
    with pytest.raises(SystemExit) as stop:
        main([*argv, *extra])  # later flags win
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in error
    assert "Traceback" not in error and not (tmp_path / "out").exists()


def test_the_script_exits_2_with_one_sentence_for_a_missing_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, str(REPO_ROOT / "run_predict.py"), "--model", str(tmp_path / "nothing")]
    result = subprocess.run(
        [*command, "--images", str(tmp_path), "--prompts", "red"], env=env, capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert result.returncode == 2
    assert f"--model {tmp_path / 'nothing'}: no such folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_slugs_are_safe_and_unique_and_folders_unique():
    assert slugify("A red car!") == "a_red_car" and slugify("Café crème") == "cafe_creme"
    assert slugify("猫") == "prompt" and slugify("CON") == "con_" and len(slugify("x" * 300)) == 80
    assert unique_slugs(["cat", "Cat!", "cat probability", "cat"]) == [
        "cat",
        "cat_2",
        "cat_probability_2",
        "cat_3",
    ]
    keys = folder_names([Path("a/1.jpg"), Path("b/1.jpg"), Path("b/2.png")])
    assert len(set(keys)) == 3 and keys[2] == "2" and all(k.startswith("1_") for k in keys[:2])
    assert predict_command.RECORD.startswith(".")  # the record is not taken for an image on a rerun


# ----------------------------------------------------------------------------------------------------
# predict(): file paths and URLs
# ----------------------------------------------------------------------------------------------------


def test_predict_takes_paths_and_urls_as_images_and_example_images(tmp_path, loaded, monkeypatch):
    import transformers.image_utils

    model, processor = loaded
    photo, example = write_photos(tmp_path, {"photo.jpg": (45, 33), "example.png": (20, 20)})
    served = []

    class Response:
        def __init__(self, url):
            served.append(url)
            self.content = (tmp_path / url.rsplit("/", 1)[-1]).read_bytes()

    monkeypatch.setattr(transformers.image_utils.httpx, "get", lambda url, **kwargs: Response(url))
    expected = model.predict(Image.open(photo), ["red", Image.open(example)], processor=processor)[0]
    for image in (str(photo), photo, "https://example.com/photo.jpg"):
        for prompt in (example, "http://example.com/example.png"):
            got = model.predict(image, ["red", prompt], processor=processor)[0]
            assert torch.equal(got, expected), (image, prompt)
    assert served.count("https://example.com/photo.jpg") == 2

    with pytest.raises(ValueError, match=r"prompts\[1\] is an empty phrase"):
        model.predict(photo, ["red", "  "], processor=processor)
    with pytest.raises(ValueError, match=r"prompts\[1\]\[0\] is an empty phrase"):
        model.predict([photo, photo], [["red"], [""]], processor=processor)
    with pytest.raises(ValueError, match=f"images\\[0\\]: {tmp_path / 'missing.png'} does not exist"):
        model.predict(tmp_path / "missing.png", "red", processor=processor)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="broken.png could not be read as an image"):
        model.predict(photo, [tmp_path / "broken.png"], processor=processor)


def test_grey_rgba_palette_and_cmyk_photos_are_segmented_too(tmp_path, model_dir):
    folder = tmp_path / "modes"
    folder.mkdir()
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for name, image in (("grey.png", rgb.convert("L")), ("rgba.png", rgb.convert("RGBA")),
                        ("palette.png", rgb.convert("P")), ("cmyk.jpg", rgb.convert("CMYK"))):  # fmt: skip
        image.save(folder / name)
    out = tmp_path / "out"
    assert main(predict_args(model_dir, out, "--images", str(folder), "--prompts", "red")) == 0
    rows, _ = scores(out)
    assert len(rows) == 4
    for row in rows:
        assert Image.open(out / row["overlay"]).size == (40, 30)


@pytest.fixture(scope="module")
def onnx_model_dir(model_dir, tmp_path_factory):
    """The tiny model's folder with its graphs in onnx/ (fp32 and int8), as `run_train.py --export_onnx` saves."""
    from clipseg_tools.onnx_export import export

    folder = tmp_path_factory.mktemp("with_onnx")
    for path in model_dir.iterdir():
        (folder / path.name).symlink_to(path)
    export(str(model_dir), folder / "onnx")
    return folder


def test_onnxruntime_backend_gives_pytorchs_masks(tmp_path, onnx_model_dir, loaded):
    """`--backend onnxruntime` on a model folder holding its graphs: the fp32 graphs give the PyTorch
    backend's masks and scores (text and example-image prompts), int8 nearly the same; records keep the
    backends apart (a rerun on the other backend redoes the images)."""
    photos = write_photos(tmp_path / "photos")
    (example,) = write_photos(tmp_path / "examples", {"star.png": (24, 24)}, seed=3)
    prompts = ["--prompts", *PROMPTS, "--example_images", str(example)]
    runs = {}
    for name, backend in {
        "pytorch": [],
        "fp32": ["--backend", "onnxruntime"],
        "int8": ["--backend", "onnxruntime", "--onnx_precision", "int8"],
    }.items():
        out = tmp_path / name
        argv = predict_args(onnx_model_dir, out, "--images", str(tmp_path / "photos"), *prompts, *backend)
        assert main(argv) == 0
        runs[name] = out
    reference, _ = scores(runs["pytorch"])
    for name, agreement in (("fp32", 0.999), ("int8", 0.9)):
        rows, payload = scores(runs[name])
        assert payload["backend"] == f"onnxruntime {name}"
        assert [(r["image"], r["prompt"]) for r in rows] == [(r["image"], r["prompt"]) for r in reference]
        tolerance = 1e-5 if name == "fp32" else 0.1
        assert all(abs(float(a["score"]) - float(b["score"])) < tolerance for a, b in zip(rows, reference))
        for path in photos:
            for slug in ("red_circle", "blue_square", "star"):
                got = np.asarray(Image.open(runs[name] / path.stem / f"{slug}.png"))
                expected = np.asarray(Image.open(runs["pytorch"] / path.stem / f"{slug}.png"))
                assert (got == expected).mean() >= agreement
    assert scores(runs["pytorch"])[1]["backend"] == "pytorch"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "onnxruntime"], "holds no exported graphs (onnx_config.json neither there nor in onnx/)"),
        (["--backend", "onnxruntime", "--model", "{onnx}", "--onnx_precision", "fp16"], "holds fp32, int8 graphs only"),
        (["--backend", "onnxruntime", "--model", "{onnx}", "--bf16"], "--bf16 is the pytorch backend's"),
    ],
)  # fmt: skip
def test_onnxruntime_backend_bad_input(tmp_path, model_dir, onnx_model_dir, capsys, extra, message):
    write_photos(tmp_path / "photos", {"a.png": (20, 20)})
    extra = [arg.format(onnx=onnx_model_dir) for arg in extra]
    argv = predict_args(model_dir, tmp_path / "out", "--images", str(tmp_path / "photos"), "--prompts", "red")
    with pytest.raises(SystemExit) as stop:
        main([*argv, *extra])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.strip().count("\n") <= 1 and not (tmp_path / "out").exists()
