"""Batches handed from data-loader workers to the main process through reused shared-memory buffers."""

import pickle
from functools import partial
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions of tensors)
from torch.utils.data import DataLoader

from clipseg_tools import handover
from clipseg_tools.batching import (
    EpochSampler,
    EvaluationImages,
    PhraseIndex,
    TrainingOptions,
    TrainingSamples,
    collate_evaluation,
    collate_training,
)
from clipseg_tools.handover import SharedBatchRing
from clipseg_tools.handover import _received as handover_received
from clipseg_tools.tiny_clip import build_word_tokenizer


@pytest.fixture(scope="module")
def collate(tmp_path_factory):
    tokenizer = build_word_tokenizer(["a", "b", "red", "car"], tmp_path_factory.mktemp("tokenizer"))
    return partial(collate_training, tokenizer=tokenizer, max_length=16, pack_labels=True)


def assert_same_tensor(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert got.dtype == expected.dtype and got.stride() == expected.stride(), name
    assert torch.equal(got, expected), name


def assert_same_batch(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert_same_tensor(got[name], value, name)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert len(got[name]) == len(value), name
            for got_tensor, tensor in zip(got[name], value):
                assert_same_tensor(got_tensor, tensor, name)
        else:
            assert got[name] == value, name


def sent_to_the_main_process(batch):
    """What the main process gets when a worker's queue pickles `batch`."""
    return pickle.loads(ForkingPickler.dumps(batch))


def loader(split, collate_fn, num_workers):
    samples = TrainingSamples(split, PhraseIndex.from_dataset(split), TrainingOptions(image_size=64))
    return DataLoader(
        samples,
        batch_size=3,
        sampler=EpochSampler(len(samples), seed=0),
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Started fresh, not forked from the test process (forking after OpenMP-parallel ops can hang),
        # which also checks that the ring pickles into a new process without its buffers.
        multiprocessing_context="spawn" if num_workers > 0 else None,
        collate_fn=collate_fn,
    )


def test_workers_batches_equal_the_collated_ones_and_reuse_their_buffers(train_split, collate, monkeypatch):
    handover._MAPPED.clear()
    received = []
    monkeypatch.setattr(handover, "_received", lambda *args: received.append(1) or handover_received(*args))
    plain = loader(train_split, collate, num_workers=0)
    through_ring = loader(train_split, SharedBatchRing(collate), num_workers=2)  # the default: 2 slots
    mapped = []
    for epoch in range(2):
        for expected_loader in (plain, through_ring):
            expected_loader.sampler.set_epoch(epoch)
        got = list(through_ring)
        assert len(got) == len(plain) >= 8  # more batches than the workers' 4 buffers
        for batch, expected in zip(got, plain):
            assert_same_batch(batch, expected)
        assert got[0]["pixel_values"].stride(1) == 1  # channels last, as collated
        mapped.append({key: buffer.data_ptr() for key, buffer in handover._MAPPED.items()})
    # Every batch came through a buffer (none went the default way); each worker brought its 2 buffers
    # once, and the second epoch's batches came through the same mappings.
    assert len(received) == 2 * len(plain)
    assert sorted(mapped[0]) == [(w, s) for w in range(2) for s in range(2)]
    assert mapped[1] == mapped[0]


@pytest.fixture
def in_a_worker(monkeypatch):
    monkeypatch.setattr(handover, "get_worker_info", lambda: SimpleNamespace(id=0))


def items(split, first, count=2):
    samples = TrainingSamples(split, PhraseIndex.from_dataset(split), TrainingOptions(image_size=64))
    return [samples[i] for i in range(first, first + count)]


def test_a_buffer_is_not_written_before_its_batch_is_received(train_split, collate, in_a_worker):
    ring = SharedBatchRing(collate, slots=2)
    batches = [items(train_split, 2 * k) for k in range(4)]
    first, second = ring(batches[0]), ring(batches[1])
    with pytest.warns(UserWarning, match="batch buffers all wait for the main process"):
        third = ring(batches[2])  # both buffers wait for the main process: the default hand-over
    assert isinstance(first, handover._BufferedBatch) and isinstance(second, handover._BufferedBatch)
    assert isinstance(third, dict)
    received_first = sent_to_the_main_process(first)
    assert_same_batch(received_first, collate(batches[0]))
    fourth = ring(batches[3])  # into the buffer the first batch has left
    assert fourth.buffer.data_ptr() == first.buffer.data_ptr()
    assert_same_batch(received_first, collate(batches[0]))  # a copy: the new batch did not change it
    assert_same_batch(sent_to_the_main_process(second), collate(batches[1]))
    assert_same_batch(sent_to_the_main_process(fourth), collate(batches[3]))


def test_a_larger_batch_gets_a_larger_buffer(train_split, collate, in_a_worker):
    ring = SharedBatchRing(collate, slots=1)
    small = ring(items(train_split, 0, count=1))
    sent_to_the_main_process(small)
    batch = items(train_split, 1, count=4)
    large = ring(batch)
    assert large.buffer.numel() > small.buffer.numel()
    assert_same_batch(sent_to_the_main_process(large), collate(batch))


def test_lists_of_tensors_travel_in_the_buffer_too(train_split, tmp_path, in_a_worker):
    """An evaluation batch: the native-size masks are a list of tensors of different sizes."""
    tokenizer = build_word_tokenizer(["a", "b", "red", "car"], tmp_path / "tokenizer")
    collate = partial(collate_evaluation, tokenizer=tokenizer, max_length=16)
    images = EvaluationImages(train_split, 64, rows=range(len(train_split)))
    batch = [images[0], images[1], images[2]]
    buffered = SharedBatchRing(collate)(batch)
    assert isinstance(dict(buffered.layout)["native_masks"], list)  # placed in the buffer, mask by mask
    received = sent_to_the_main_process(buffered)
    assert_same_batch(received, collate(batch))
    assert len({tuple(mask.shape) for mask in received["native_masks"]}) > 1


def test_in_the_main_process_it_is_the_collate_function(train_split, collate):
    batch = items(train_split, 0)
    assert_same_batch(SharedBatchRing(collate)(batch), collate(batch))


def test_bad_arguments_are_named(in_a_worker):
    with pytest.raises(ValueError, match="slot"):
        SharedBatchRing(list, slots=0)
    with pytest.raises(TypeError, match="returns a dict"):
        SharedBatchRing(list)([1, 2])
