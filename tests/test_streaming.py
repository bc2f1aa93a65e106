"""run_train.py --streaming: the training split read as a stream (shuffled, split between processes, rows converted
as they come), the validation split loaded as usual, resume from the stream's position, and what is refused."""

import hashlib
import json

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import run_script, train_args, two_process_launcher

from clipseg_tools.batching import TrainingOptions
from clipseg_tools.own_data import SourceOptions
from clipseg_tools.streaming import (
    PhrasePool,
    StreamedSamples,
    epoch_batches,
    process_stream,
    row_form,
    start_position,
    stream_loader,
)


@pytest.fixture(scope="module")
def referring_folder(tmp_path_factory):
    """Synthetic referring rows as a Parquet folder with a validation split (one file, one shard, per split)."""
    from clipseg_tools.own_synthetic import write_referring

    folder = tmp_path_factory.mktemp("own") / "my_data"
    return write_referring(folder, {"train": 24, "validation": 6}, seed=5)


@pytest.fixture(scope="module")
def semantic_folder(tmp_path_factory):
    from clipseg_tools.own_synthetic import write_semantic

    return write_semantic(tmp_path_factory.mktemp("semantic") / "label_maps", {"train": 24, "validation": 6})


@pytest.fixture(autouse=True)
def no_pause_after_shuffling(monkeypatch):
    """`datasets` pauses 5 s each time a shuffled Parquet stream is read through (for a pyarrow shutdown bug, of
    an interpreter exiting while its reading threads run): these tests read many short streams in one."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def streaming_args(folder, clip_dir, output_dir, *extra):
    argv = train_args(folder, clip_dir, output_dir, "--streaming", *extra)
    argv[argv.index("--data_dir")] = "--dataset_name"
    return argv


def results_of(folder):
    return json.loads((folder / "all_results.json").read_text())


def losses_of(folder):
    return [e["train_loss"] for e in json.loads((folder / "training_log.json").read_text())["log_history"]]


def train_stream(folder):
    return datasets.load_dataset(str(folder), streaming=True)["train"]


def samples_of(folder, rank=0, world_size=1, buffer_size=16, negative_prob=0.5):
    """StreamedSamples of a small model size over a folder's training split, as run_train.py makes them."""
    stream = train_stream(folder)
    form = row_form(stream, SourceOptions(), "the train split", str(folder), local_root=str(folder))
    options = TrainingOptions(image_size=32, phrases_per_image=2, negative_prob=negative_prob, seed=7)
    split = process_stream(stream, seed=7, buffer_size=buffer_size, rank=rank, world_size=world_size)
    return StreamedSamples(split, form, options, rank, "the train split")


def digests(batch):
    """One fingerprint per sample of a batch: its image, its phrases and their masks."""
    phrases_per_image = np.bincount(batch["image_index"].numpy())
    ids = batch["input_ids"].split(phrases_per_image.tolist())
    labels = batch["packed_labels"].split(phrases_per_image.tolist())
    return [
        hashlib.sha1(pixels.numpy().tobytes() + i.numpy().tobytes() + m.numpy().tobytes()).hexdigest()
        for pixels, i, m in zip(batch["pixel_values"], ids, labels)
    ]


@pytest.mark.parametrize("shape", ["referring", "semantic"])
def test_streaming_trains_on_your_own_data_and_evaluates_on_its_validation_split(
    tmp_path, referring_folder, semantic_folder, tiny_clip_dir, shape
):
    folder = referring_folder if shape == "referring" else semantic_folder
    out = tmp_path / "out"
    result = run_script(streaming_args(folder, tiny_clip_dir, out, "--max_train_steps", "4"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training data: streamed, one sample per row, shuffled 1,000 rows at a time (split train)" in (
        result.stdout
    )
    assert len(losses_of(out)) == 4 and all(0 < loss < 10 for loss in losses_of(out))
    results = results_of(out)
    validation = datasets.load_dataset(str(folder))["validation"]
    if shape == "referring":  # every mask of the validation split scored (by its first wording)
        assert results["eval_samples"] == sum(len(masks) for masks in validation["mask"])
    else:  # a prompt per class present, and the multi-class map scored
        assert results["eval_samples"] > len(validation) and "eval_class_map_mean_iou" in results


def test_each_process_streams_its_own_rows_and_together_they_cover_the_split(referring_folder):
    def fingerprint(row):
        return hashlib.sha1(row["image"]["bytes"]).hexdigest()

    everything = [fingerprint(row) for row in train_stream(referring_folder).decode(False)]
    shares = [
        [fingerprint(row) for row in process_stream(train_stream(referring_folder), 7, 16, rank, 2)]
        for rank in (0, 1)
    ]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything) and len(set(everything)) == 24
    for rank in (0, 1):  # one sample per row of the process's share
        assert len(list(samples_of(referring_folder, rank, world_size=2))) == len(shares[rank])


@pytest.mark.slow
def test_two_processes_train_on_a_stream_together(tmp_path, referring_folder, tiny_clip_dir):
    out = tmp_path / "ddp"
    argv = streaming_args(
        referring_folder, tiny_clip_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2"
    )
    result = run_script(argv, launcher=two_process_launcher(29541))
    assert result.returncode == 0, result.stderr[-4000:]
    results = results_of(out)
    assert results["num_processes"] == 2
    assert len(set(results["decoder_checksum_per_process"])) == 1
    # Each process took 2 batches of 4 images of its own half (12 rows): both positions saved.
    saved = json.loads((out / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert saved["stream_positions"] == [start_position(0) | {"rows": [8]}] * 2


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_resumed_stream_gives_the_weights_of_the_uninterrupted_run_bitwise(
    tmp_path, referring_folder, tiny_clip_dir, workers
):
    # 12 batches of 4 images over 24 rows: two epochs (the second reshuffled), the checkpoint at step 4 (batch 8)
    # in the middle of the second, accumulation and dropout on, half the phrases negatives.
    common = (
        "--max_train_steps", "6", "--checkpointing_steps", "4", "--gradient_accumulation_steps", "2",
        "--negative_prob", "0.5", "--dataloader_num_workers", workers,
    )  # fmt: skip
    straight = tmp_path / "straight"
    result = run_script(streaming_args(referring_folder, tiny_clip_dir, straight, *common))
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = straight / "checkpoints" / "step_4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["stream_positions"] == [{"epoch": 1, "workers": int(workers), "rows": [8]}]

    resumed = tmp_path / "resumed"
    argv = streaming_args(
        referring_folder, tiny_clip_dir, resumed, *common, "--resume_from_checkpoint", str(checkpoint)
    )
    result = run_script(argv)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "--streaming: resuming epoch 1 of the stream after the rows each process had taken (8): exactly the samples "
        "and order of the uninterrupted run"
    ) in result.stdout
    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    decoder = [key for key in expected if key.startswith("decoder.")]
    assert decoder and all(torch.equal(expected[key], got[key]) for key in decoder)
    assert losses_of(resumed) == losses_of(straight)


def test_a_position_at_the_end_of_an_epoch_moves_on_to_the_next(referring_folder, tiny_clip_dir):
    from transformers import AutoTokenizer

    samples = samples_of(referring_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    loader = stream_loader(
        samples, tokenizer, 16, images_per_batch=4, device=torch.device("cpu"), num_workers=0, seed=0
    )
    positions = [{"epoch": 0, "workers": 0, "rows": [24]}]  # every row of epoch 0 taken
    assert list(epoch_batches(loader, positions, 0)) == []
    assert positions == [start_position(0, epoch=1)]


def test_with_several_workers_a_resumed_stream_sees_the_same_samples_in_another_order(
    tmp_path, referring_folder, tiny_clip_dir
):
    """The README's claim: each worker continues after its own rows; the workers' batches interleave otherwise."""
    from transformers import AutoTokenizer

    two_files = tmp_path / "two_files"
    (two_files / "data").mkdir(parents=True)
    train = datasets.load_dataset(str(referring_folder))["train"]
    for k in range(2):
        train.shard(2, k).to_parquet(two_files / "data" / f"train-0000{k}-of-00002.parquet")
    samples = samples_of(two_files)
    assert samples.stream.num_shards == 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    loader = stream_loader(
        samples, tokenizer, 16, images_per_batch=2, device=torch.device("cpu"), num_workers=2, seed=0
    )

    straight = [d for batch in epoch_batches(loader, [start_position(2)], 0) for d in digests(batch)]
    positions = [start_position(2)]
    batches = epoch_batches(loader, positions, 0)
    before = [d for _, batch in zip(range(3), batches) for d in digests(batch)]
    batches.close()  # the run stopped (the loader had read ahead)
    assert positions[0]["rows"] == [4, 2]  # batches 0 and 2 from the first worker, 1 from the second
    after = [d for batch in epoch_batches(loader, positions, 0) for d in digests(batch)]
    assert len(straight) == 24 and sorted(before + after) == sorted(straight)
    assert before + after != straight


def test_rows_in_the_projects_form_stream_as_they_are_and_never_name_a_file(tmp_path, referring_folder):
    """The PhraseCut export's shape: rows with their tasks, trained on as they are."""
    from clipseg_tools.data import load_splits
    from clipseg_tools.errors import CommandError

    (rows,) = load_splits({"--split": "train"}, dataset_name=str(referring_folder))
    (tmp_path / "export" / "data").mkdir(parents=True)
    rows.to_parquet(tmp_path / "export" / "data" / "train-00000-of-00001.parquet")
    samples = samples_of(tmp_path / "export")
    assert samples.form.kind == "project"
    assert len(list(samples)) == 24
    with pytest.raises(CommandError, match="row 3 of the stream holds no image bytes"):
        samples.form.convert({**rows[0], "image": {"bytes": None, "path": "/etc/passwd"}}, 3)


def test_the_same_seed_and_epoch_give_the_same_samples(referring_folder):
    def epoch(number):
        samples = samples_of(referring_folder)
        samples.start_at(number)
        return list(samples)

    first, again, next_epoch = epoch(0), epoch(0), epoch(1)
    assert len(first) == 24
    for a, b in zip(first, again):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["masks"], b["masks"])
        assert a["phrases"] == b["phrases"]
    assert any(not torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, next_epoch))
    # Negatives (empty masks) come from phrases seen earlier in the stream, never from the sample's own image.
    assert any(not mask.any() for sample in first for mask in sample["masks"])


def test_negatives_come_from_a_bounded_pool_of_the_latest_phrases():
    pool = PhrasePool(size=3)
    pool.add(["a", "b", "a", "c", "d"])  # "a" is the oldest: it goes
    assert sorted(pool.phrases) == ["b", "c", "d"]
    rng = np.random.default_rng(0)
    assert {pool.absent({"b", "c"}, rng) for _ in range(10)} == {"d"}
    assert pool.absent({"b", "c", "d"}, rng) == ""  # nothing absent: a negative with no text
    fixed = PhrasePool(size=3, fixed=["wall", "sky"])  # a semantic data set's classes
    fixed.add(["tree"])
    assert fixed.phrases == ["wall", "sky"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data_dir", "{tmp}"], "--streaming reads a Hub id or a local Parquet folder (--dataset_name), and "
         "--data_dir (a raw PhraseCut folder) is prepared whole"),
        (["--dataset_name", "{coco}"], "is a COCO folder, converted whole from its annotation files: drop "
         "--streaming"),
        (["--dataset_name", "{data}", "--mix_visual_prompts"], "--mix_visual_prompts takes example images from "
         "other images of the same phrase, which a stream cannot reach"),
        (["--dataset_name", "{data}", "--shrink_train_images"], "drop --shrink_train_images or --streaming"),
        (["--dataset_name", "{data}", "--shuffle_buffer_size", "0"], "--shuffle_buffer_size must be at least 1"),
    ],
)  # fmt: skip
def test_what_a_stream_cannot_do_is_refused_in_one_sentence(
    tmp_path, referring_folder, tiny_clip_dir, capsys, extra, message
):
    import run_train

    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_train.json").write_text("{}")
    places = {"{tmp}": str(tmp_path), "{coco}": str(tmp_path / "coco"), "{data}": str(referring_folder)}
    extra = [places.get(e, e) for e in extra]
    argv = [
        "--streaming",
        "--clip_model_name_or_path",
        str(tiny_clip_dir),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    with pytest.raises(SystemExit) as stop:
        run_train.parse_args([*argv, *extra])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("error:") == 1


def test_streaming_data_without_a_validation_split_is_refused(tmp_path, tiny_clip_dir):
    from clipseg_tools.own_synthetic import write_referring

    folder = write_referring(tmp_path / "train_only", {"train": 8}, seed=1)
    result = run_script(streaming_args(folder, tiny_clip_dir, tmp_path / "out", "--max_train_steps", "2"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: --validation_split 'validation': --dataset_name {folder} has no such split (it has ['train']), and "
        "with --streaming no share of the training split can be held out for it: give a --validation_split that "
        "exists, or drop --streaming"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_the_negatives_pool_reads_each_masks_first_wording_whatever_form_the_masks_take():
    from clipseg_tools.streaming import RowForm

    form = RowForm("referring")
    polygons = [[1, 1, 5, 1, 5, 5]]
    assert form.phrases({"mask": polygons, "prompt": "red circle"}) == ["red circle"]  # one mask as polygons
    assert form.phrases({"mask": {"counts": "02", "size": [1, 2]}, "prompt": ["a", "b"]}) == [
        "a"
    ]  # RLE, wordings
    assert form.phrases({"mask": [polygons, polygons], "prompt": ["x", ["y", "z"]]}) == ["x", "y"]
