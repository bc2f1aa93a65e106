"""The one way the project makes a DataLoader (training, evaluation, the failure gallery, the benchmarks),
and how many worker processes it gets by default.

Every loader: batches handed over from its workers through reused shared memory (`SharedBatchRing`), pinned
on a GPU machine so that `transforms.model_inputs` copies them without blocking, and its own seeded generator,
so that iterating it draws nothing from the global random state (a resumed run stays exact).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .handover import SharedBatchRing

MAX_DEFAULT_WORKERS = 16  # each worker holds its own memory and shared buffers


def create_loader(
    dataset: Dataset,
    collate: Callable[[list], dict[str, Any]],
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    persistent_workers: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A loader of `dataset` in `sampler`'s order (the dataset's own order by default). `persistent_workers`
    for a loader iterated many times (training's epochs): its workers and their buffers are started once."""
    pin = device.type == "cuda"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=SharedBatchRing(collate, pin_memory=pin),
    )


def default_num_workers() -> int:
    """Data-loader workers per process when none are asked for: the CPUs this process may use, shared
    among the machine's training processes (`LOCAL_WORLD_SIZE`, set by `accelerate launch`), less one for
    each process's own thread, at most `MAX_DEFAULT_WORKERS`. A fast GPU needs many: one worker prepares
    a few hundred to a thousand samples a second."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(0, min(MAX_DEFAULT_WORKERS, usable_cpus() // processes - 1))


def usable_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPUs this process may run on, or its container's CPU quota when that is smaller (`docker --cpus`,
    a Kubernetes limit: cgroup v2's `cpu.max` holds "quota period", or "max period" for none)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
        limit = -(-int(quota) // int(period))  # a quota of 1.5 CPUs runs on 2
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        return cpus
    return max(1, min(cpus, limit))
