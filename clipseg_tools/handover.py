"""Data-loader workers hand their batches to the main process through shared-memory buffers they reuse.

By default a worker moves every tensor of every batch into fresh shared memory (page faults as it writes)
and hands its file over; the main process fetches the descriptor from the worker, maps the file and reads
it (page faults again). One thread of the main process (the pin-memory thread on a GPU) does this for every
worker's batches, so on a fast GPU it can bound the data-fed training loop (`benchmarks/data_samples.py`
measures that share).

`SharedBatchRing` wraps a collate function: in a worker it writes each batch into one of a few buffers the
worker keeps (a ring); the main process keeps every buffer mapped after the first batch it brought, copies
the batch out (into pinned memory for a GPU) as it receives it, and marks the buffer free again. A buffer
that is still waiting to be received is never written: when the ring has no free buffer the batch goes the
default way, so nothing can be overwritten and nothing waits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils.data import get_worker_info

_HEADER_BYTES = 64  # byte 0: the buffer's busy flag, set by the worker, cleared by the main process
_ALIGNMENT = 64  # every tensor starts at a multiple of this, so any dtype can view its bytes

# The main process's references to the buffers it received, keyed by (worker id, slot): they keep each
# buffer mapped, so the worker's next batch in it arrives through torch's cache of shared storages
# (no new mapping, no page faults). A restarted worker's buffer, or another loader's worker's with the same
# id (evaluation's), replaces the entry: at most workers x slots buffers stay mapped, and a replaced one
# costs its worker one new mapping.
_MAPPED: dict[tuple[int, int], torch.Tensor] = {}


class _Place(NamedTuple):
    """Where a tensor lies in a buffer: stored dense in the order of its dimensions in memory."""

    offset: int  # bytes from the buffer's start
    dtype: torch.dtype
    dense_shape: tuple[int, ...]  # the shape once permuted by `order`
    order: tuple[int, ...]  # the permutation that makes the tensor contiguous


class SharedBatchRing:
    """A collate function whose batches travel from a worker to the main process through reused buffers.

    `collate(items)` must return a dict; its tensors, and lists of tensors, arrive as copies with the same
    dtypes and shapes, in pinned memory if `pin_memory`; a dense tensor keeps its strides (a channels-last
    batch stays channels last), others arrive contiguous. Other values arrive as they are pickled. Without
    workers it is `collate` itself.

    `slots`: buffers per worker. A loader gives a worker its next batch to make when it has received one of
    that worker's batches (which frees its buffer), so the loader's `prefetch_factor` (2 by default) is
    enough; when none is free the batch goes the default way, with a warning the first time.
    """

    def __init__(self, collate: Callable[[list], dict[str, Any]], slots: int = 2, pin_memory: bool = False):
        if slots < 1:
            raise ValueError(f"SharedBatchRing needs at least one slot, got {slots}")
        self.collate = collate
        self.slots = slots
        self.pin_memory = pin_memory
        self._buffers: list[torch.Tensor] = []  # this worker's ring; empty in the main process
        self._next = 0
        self._warned = False

    def __call__(self, items: list) -> Any:
        batch = self.collate(items)
        worker = get_worker_info()
        if worker is None:
            return batch
        return self._in_free_buffer(batch, worker.id)

    def __getstate__(self) -> dict[str, Any]:
        # A worker started by spawning gets its own empty ring, never the parent's buffers.
        return {**self.__dict__, "_buffers": [], "_next": 0, "_warned": False}

    def _in_free_buffer(self, batch: dict[str, Any], worker_id: int) -> Any:
        layout, needed = _layout(batch)
        slot = self._free_slot()
        if slot is None:  # every buffer is still on its way to the main process
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"data-loader worker {worker_id}: its {self.slots} batch buffers all wait for the main "
                    "process, so batches go the slower default way; give SharedBatchRing as many slots as "
                    "the loader's prefetch_factor",
                    stacklevel=2,
                )
            return batch
        if slot == len(self._buffers):
            self._buffers.append(_new_buffer(needed))
        elif self._buffers[slot].numel() < needed:
            self._buffers[slot] = _new_buffer(needed + needed // 4)  # room for somewhat larger batches
        buffer = self._buffers[slot]
        buffer[0] = 1
        for name, spec in layout:
            for tensor, place in _placed(batch[name], spec):
                _view(buffer, place).copy_(tensor.permute(place.order))
        return _BufferedBatch(buffer, (worker_id, slot), layout, batch, self.pin_memory)

    def _free_slot(self) -> int | None:
        for step in range(self.slots):
            slot = (self._next + step) % self.slots
            if slot >= len(self._buffers) or int(self._buffers[slot][0]) == 0:
                self._next = slot + 1
                return slot
        return None


class _BufferedBatch:
    """A batch written into a worker's buffer; pickled, it carries the buffer and where each tensor lies."""

    def __init__(
        self,
        buffer: torch.Tensor,
        key: tuple[int, int],
        layout: list,
        batch: dict[str, Any],
        pin_memory: bool,
    ):
        self.buffer, self.key, self.layout, self.pin_memory = buffer, key, layout, pin_memory
        self.others = {name: batch[name] for name, spec in layout if spec is None}

    def __reduce__(self):
        return _received, (self.buffer, self.key, self.layout, self.others, self.pin_memory)


def _received(
    buffer: torch.Tensor, key: tuple[int, int], layout: list, others: dict[str, Any], pin_memory: bool
) -> dict[str, Any]:
    """In the main process: copy the batch out of the worker's buffer and give the buffer back."""
    _MAPPED[key] = buffer

    def copied(place: _Place) -> torch.Tensor:
        source = _view(buffer, place)
        copy = torch.empty(source.shape, dtype=source.dtype, pin_memory=pin_memory).copy_(source)
        return copy.permute(_inverse(place.order))

    batch = {}
    try:
        for name, spec in layout:
            if spec is None:
                batch[name] = others[name]
            else:
                batch[name] = copied(spec) if isinstance(spec, _Place) else [copied(place) for place in spec]
    finally:
        buffer[0] = 0  # even if a copy failed: the worker may use the buffer again
    return batch


def _layout(batch: dict[str, Any]) -> tuple[list, int]:
    """Where each tensor goes in a buffer, and the bytes needed. Per value: (name, spec), the spec being a
    tensor's `_Place`, a list of places for a list of tensors (the official protocol's native-size masks),
    or None for anything else (pickled as it is)."""
    if not isinstance(batch, dict):
        raise TypeError(f"SharedBatchRing needs a collate function that returns a dict, got {type(batch)}")
    layout, offset = [], _HEADER_BYTES

    def place(tensor: torch.Tensor) -> _Place:
        nonlocal offset
        order = _memory_order(tensor)
        start = offset
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGNMENT) * _ALIGNMENT
        return _Place(start, tensor.dtype, tuple(tensor.permute(order).shape), order)

    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            layout.append((name, place(value)))
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            layout.append((name, [place(v) for v in value]))
        else:
            layout.append((name, None))
    return layout, offset


def _placed(value: Any, spec: Any) -> list[tuple[torch.Tensor, _Place]]:
    """(tensor, place) pairs of one batch value."""
    if spec is None:
        return []
    return [(value, spec)] if isinstance(spec, _Place) else list(zip(value, spec))


def _memory_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """The permutation that makes `tensor` contiguous, or the identity when none does (it is copied)."""
    order = tuple(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    return order if tensor.permute(order).is_contiguous() else tuple(range(tensor.dim()))


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=lambda d: order[d]))


def _view(buffer: torch.Tensor, place: _Place) -> torch.Tensor:
    nbytes = torch.Size(place.dense_shape).numel() * place.dtype.itemsize
    return buffer[place.offset : place.offset + nbytes].view(place.dtype).view(place.dense_shape)


def _new_buffer(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes, dtype=torch.uint8).share_memory_()
