"""run_eval.py: both protocols, ours vs the same weights in stock transformers, gallery, processes, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import two_process_launcher  # noqa: E402
from PIL import Image
from transformers import AutoTokenizer

import run_eval
from clipseg_tools.errors import CommandError
from modeling_clipseg_custom import ClipSegCustomModel, make_processor

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_clip_dir):
    """One tiny model saved twice: as ours, and exported as a stock transformers CLIPSeg checkpoint."""
    torch.manual_seed(5)
    model = ClipSegCustomModel.from_clip(
        str(tiny_clip_dir), image_size=64, reduce_dim=16, extract_layers=[0, 1], decoder_intermediate_size=32
    )
    with torch.no_grad():  # a visible foreground so that every metric has something to count
        model.decoder.transposed_convolution[-1].bias.fill_(-0.5)
    processor = make_processor(AutoTokenizer.from_pretrained(tiny_clip_dir), image_size=64)
    root = tmp_path_factory.mktemp("models")
    model.save_pretrained(root / "ours")
    processor.save_pretrained(root / "ours")
    model.save_as_clipseg(root / "stock", processor=processor)
    return root


def test_ours_and_its_stock_export_score_identically_in_one_compare_run(
    tmp_path, synthetic_data, saved_models
):
    out = tmp_path / "eval"
    summaries = run_eval.main(
        [
            "--model", str(saved_models / "ours"),
            "--compare", f"transformers:{saved_models / 'stock'}", str(saved_models / "stock"),
            "--data_dir", str(synthetic_data),
            "--cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(out),
            "--num_workers", "0",
            "--gallery_max", "5",
        ]
    )  # fmt: skip
    labels = list(summaries)
    assert len(labels) == 3
    reference = summaries[labels[0]]
    assert reference["num_phrases"] > 0
    for other in labels[1:]:
        assert summaries[other]["clipseg_paper_protocol"] == reference["clipseg_paper_protocol"], other
        assert summaries[other]["official_protocol"] == reference["official_protocol"], other

    markdown = (out / "results.md").read_text()
    for label in labels + ["paper: CLIPSeg (PC+), D=64"]:
        assert label in markdown
    assert markdown.count("| subset | count |") == len(labels)  # the per-subset tables name their rows
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["models"]) == set(labels)
    assert payload["models"][labels[0]]["official_protocol"]["all"]["count"] == reference["num_phrases"]

    gallery = out / "gallery" / labels[0]
    index = (gallery / "index.html").read_text()
    pictures = sorted(p.name for p in gallery.glob("0*.png"))
    assert 0 < len(pictures) <= 5
    for name in pictures + ["pr_curve.png", "iou_histogram.png"]:
        assert f'href="{name}"' in index
        with Image.open(gallery / name) as image:
            image.verify()


def test_two_processes_give_the_numbers_of_one(tmp_path, synthetic_data, saved_models):
    """Also: the two processes' batches come from data-loader workers (through their reused buffers), the
    one process's are made in place."""
    common = [
        "--model", str(saved_models / "ours"),
        "--data_dir", str(synthetic_data),
        "--cache_dir", str(tmp_path / "cache"),
        "--gallery_max", "0",
        "--batch_size", "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    launch = two_process_launcher(29519)
    two = subprocess.run(
        launch + [str(REPO_ROOT / "run_eval.py"), *common, "--num_workers", "1", "--output_dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    run_eval.main([*common, "--num_workers", "0", "--output_dir", str(tmp_path / "one")])
    one_models = json.loads((tmp_path / "one" / "results.json").read_text())["models"]
    two_models = json.loads((tmp_path / "two" / "results.json").read_text())["models"]
    assert one_models == two_models


@pytest.mark.parametrize(
    "folder, message",
    [
        ("notes", "is not a model folder (no config.json)"),
        ("run/checkpoints/step_5", "is a training checkpoint"),
        ("missing", "no such folder"),
        ("notes/hello.txt", "is a file, not a model folder"),
    ],
)
def test_a_folder_that_is_not_a_model_is_named_before_any_scoring(
    tmp_path, synthetic_data, saved_models, capsys, folder, message
):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "hello.txt").write_text("not a model")
    (tmp_path / "run" / "checkpoints" / "step_5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_5" / "trainer_state.json").write_text("{}")
    argv = ["--model", str(saved_models / "ours"), "--compare", str(tmp_path / folder)]
    with pytest.raises(SystemExit) as stop:
        run_eval.main([*argv, "--data_dir", str(synthetic_data), "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert f"--model/--compare {tmp_path / folder}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # the first model was not scored


def test_a_model_folder_that_does_not_load_is_named(tmp_path, synthetic_data):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")  # passes the early check, fails to load
    with pytest.raises(CommandError, match="is not a loadable model"):
        run_eval.main(["--model", str(tmp_path / "broken"), "--data_dir", str(synthetic_data),
                       "--cache_dir", str(tmp_path / "c"), "--num_workers", "0"])  # fmt: skip


def test_a_split_that_was_not_prepared_is_named(tmp_path, saved_models):
    from phrasecut_dataset import write_synthetic_phrasecut

    data = write_synthetic_phrasecut(tmp_path / "data", {"train": 3}, seed=1)
    export = tmp_path / "export"
    from phrasecut_dataset import load_phrasecut

    load_phrasecut(data, cache_dir=tmp_path / "c", splits=["train"])["train"].to_parquet(
        str(export / "data" / "train-00000-of-00001.parquet")
    )
    with pytest.raises(
        CommandError,
        match="--split 'test': --dataset_name .* has no prepared split 'test' \\(it has \\['train'\\]\\)",
    ):
        run_eval.main(
            [
                "--model",
                str(saved_models / "ours"),
                "--dataset_name",
                str(export),
                "--cache_dir",
                str(tmp_path / "c"),
            ]
        )


def test_a_prediction_of_the_wrong_shape_is_reported(tmp_path, synthetic_data, saved_models, monkeypatch):
    real_load = run_eval.load_model

    class HalfSize(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **inputs):
            output = self.inner(**inputs)
            output.logits = output.logits[:, ::2, ::2]
            return output

    monkeypatch.setattr(
        run_eval,
        "load_model",
        lambda spec, device: (HalfSize(real_load(spec, device)[0]), real_load(spec, device)[1]),
    )
    with pytest.raises(CommandError, match=r"predicted logits of shape \(\d+, 32, 32\)"):
        run_eval.main(
            [
                "--model",
                str(saved_models / "ours"),
                "--data_dir",
                str(synthetic_data),
                "--cache_dir",
                str(tmp_path / "c"),
                "--num_workers",
                "0",
            ]
        )


def test_command_line_errors_exit_non_zero(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_eval.py"), "--model", str(tmp_path), "--data_dir", str(tmp_path / "missing")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--data_dir" in result.stderr


def test_official_counts_resize_each_phrase_to_its_own_image_and_keep_its_place():
    from torch.nn import functional as F

    from clipseg_tools.evaluation import official_counts

    generator = torch.Generator().manual_seed(0)
    image_index = torch.tensor([1, 0, 2, 1, 0, 1])  # an image's phrases are not side by side
    sizes = {0: (37, 50), 1: (64, 23), 2: (16, 16)}
    probs = torch.rand(6, 32, 32, generator=generator)
    masks = [torch.rand(sizes[i], generator=generator) > 0.5 for i in image_index.tolist()]
    inter, union = official_counts(probs, image_index, masks, threshold=0.3)
    for phrase, image in enumerate(image_index.tolist()):
        alone = (
            F.interpolate(probs[phrase][None, None], size=sizes[image], mode="bilinear")[0, 0].numpy() > 0.3
        )
        truth = masks[phrase].numpy()
        assert (int(inter[phrase]), int(union[phrase])) == ((alone & truth).sum(), (alone | truth).sum())


def test_loading_a_saved_model_asks_no_question(saved_models, monkeypatch):
    questions = []  # transformers' trust_remote_code question: it waits 15 s for an answer in a terminal
    monkeypatch.setattr("builtins.input", lambda prompt="": questions.append(prompt))
    model, processor = run_eval.load_model(str(saved_models / "ours"), torch.device("cpu"))
    assert not questions
    assert type(processor).__name__ == "CLIPSegProcessor" and type(model).__name__ == "ClipSegCustomModel"


# -- issue 16 ------------------------------------------------------------------------------------------


def test_predict_follows_the_config_image_size_as_the_evaluation_does(tmp_path, synthetic_data, saved_models):
    """A folder whose preprocessor_config.json resizes to 96 while config.image_size is 64: predict() and the
    evaluation both run the model at 64, and give the same maps."""
    import shutil

    from torch.nn import functional as F

    from clipseg_tools.batching import evaluation_loader
    from clipseg_tools.data import load_splits
    from clipseg_tools.evaluation import predict_logits
    from clipseg_tools.transforms import decode_image, model_inputs

    folder = tmp_path / "model"
    shutil.copytree(saved_models / "ours", folder)
    make_processor(AutoTokenizer.from_pretrained(folder), image_size=96).save_pretrained(folder)
    model, processor = run_eval.load_model(str(folder), torch.device("cpu"))
    assert model.config.image_size == 64 and processor.image_processor.size["height"] == 96

    (split,) = load_splits({"--split": "test"}, data_dir=str(synthetic_data), cache_dir=str(tmp_path / "c"))
    loader = evaluation_loader(
        split, [0], model, processor.tokenizer, batch_size=1, device=torch.device("cpu")
    )
    batch = next(iter(loader))
    with torch.no_grad():
        logits = predict_logits(model, model_inputs(batch, "cpu"))
    image = decode_image(split[0]["image"])
    # predict() resizes the logits to the image's size, then applies the sigmoid
    expected = torch.sigmoid(
        F.interpolate(logits[:, None], size=(image.height, image.width), mode="bilinear")
    )[:, 0]
    for given in (processor, None):  # passed, and loaded from the model's folder
        maps = model.predict(image, batch["phrases"], processor=given)[0]
        assert maps.shape == expected.shape
        assert (maps - expected).abs().max() < 1e-4, float((maps - expected).abs().max())


# -- issue 16: bad data and arguments ------------------------------------------------------------------


def test_an_image_cell_holding_a_path_is_refused_not_read(tmp_path, saved_models):
    """A Parquet row whose image cell names a file instead of carrying bytes must not make the loader read that
    file of this machine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from phrasecut_dataset import export_dataset, load_phrasecut, write_synthetic_phrasecut

    raw = write_synthetic_phrasecut(tmp_path / "raw", {"test": 3}, seed=1, min_size=32, max_size=48)
    export = export_dataset(
        load_phrasecut(raw, cache_dir=tmp_path / "c", splits=["test"]), tmp_path / "export"
    )
    outside = tmp_path / "outside.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(outside)
    (shard,) = (export / "data").glob("test-*.parquet")
    table = pq.read_table(shard)
    cells = table.column("image").to_pylist()
    cells[1] = {"bytes": None, "path": str(outside)}
    column = pa.array(cells, type=table.schema.field("image").type)
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", column), shard)
    argv = ["--model", str(saved_models / "ours"), "--dataset_name", str(export), "--split", "test"]
    with pytest.raises(
        CommandError, match=r"row 1 of the test split of --dataset_name .* holds no image bytes"
    ):
        run_eval.main([*argv, "--cache_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "out")])


def test_skip_bad_samples_is_a_flag_of_run_eval_too(tmp_path, saved_models):
    import shutil

    from phrasecut_dataset import write_synthetic_phrasecut

    raw = write_synthetic_phrasecut(tmp_path / "raw", {"test": 3}, seed=1, min_size=32, max_size=48)
    first = json.loads((raw / "refer_test.json").read_text())[0]["image_id"]
    (raw / "images" / f"{first}.jpg").unlink()
    argv = ["--model", str(saved_models / "ours"), "--data_dir", str(raw), "--num_workers", "0"]
    argv += ["--gallery_max", "0", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(CommandError, match="image file is missing.*pass --skip_bad_samples"):
        run_eval.main([*argv, "--cache_dir", str(tmp_path / "c1")])
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    summaries = run_eval.main([*argv, "--cache_dir", str(tmp_path / "c2"), "--skip_bad_samples"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["num_images"] == 2
    assert next(iter(summaries.values()))["num_phrases"] > 0


def test_nan_logits_are_reported_as_non_finite_model_outputs(
    tmp_path, synthetic_data, saved_models, monkeypatch
):
    real_load = run_eval.load_model

    class NanOutputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **inputs):
            output = self.inner(**inputs)
            output.logits = torch.full_like(output.logits, float("nan"))
            return output

    def load(spec, device):
        model, processor = real_load(spec, device)
        return NanOutputs(model), processor

    monkeypatch.setattr(run_eval, "load_model", load)
    with pytest.raises(CommandError) as caught:
        run_eval.main(["--model", str(saved_models / "ours"), "--data_dir", str(synthetic_data),
                       "--cache_dir", str(tmp_path / "c"), "--num_workers", "0"])  # fmt: skip
    assert "not finite (NaN logits)" in str(caught.value) and "sigmoid" not in str(caught.value)
