"""Loading the splits a script needs, from a raw PhraseCut folder or from a prepared export."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from phrasecut_dataset.builder import SPLIT_ALIASES

REQUIRED_COLUMNS = ("image", "image_id", "width", "height", "tasks")
MAX_DEFAULT_WORKERS = 16  # each worker holds its own memory and shared buffers; the H200 runs used 14


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


def canonical_split(name: str) -> str:
    """`val` is PhraseCut's own name for the split the builder calls `validation`."""
    return SPLIT_ALIASES.get(name, name)


def load_splits(
    names: Sequence[str],
    data_dir: str | None = None,
    dataset_name: str | None = None,
    cache_dir: str | None = None,
    skip_bad: bool = False,
    accelerator: Any = None,
) -> dict[str, datasets.Dataset]:
    """The named splits, images left as bytes (a transform decodes each image once for all its phrases).

    `data_dir` is a raw PhraseCut folder, prepared once by the project's builder (the first process
    prepares, the others read the cache); `dataset_name` is a prepared export (Parquet folder or Hub id).
    Raises ValueError with one clear sentence for a split that is missing or rows of another format.
    """
    wanted = [canonical_split(name) for name in names]
    if data_dir:
        from phrasecut_dataset import load_phrasecut

        def load() -> Any:
            return load_phrasecut(
                data_dir, cache_dir=cache_dir, splits=sorted(set(wanted)), skip_bad=skip_bad
            )

        source = f"--data_dir {data_dir}"
    else:

        def load() -> Any:
            try:
                return datasets.load_dataset(dataset_name, cache_dir=cache_dir)
            except (OSError, FileNotFoundError, ValueError) as error:
                raise ValueError(
                    f"--dataset_name {dataset_name} could not be loaded ({error}); give a folder written by "
                    "`python -m phrasecut_dataset.publish` or its Hub id (a local copy when offline)"
                ) from error

        source = f"--dataset_name {dataset_name}"
    if accelerator is not None:
        with accelerator.main_process_first():
            splits = load()
    else:
        splits = load()

    loaded = {}
    for name in wanted:
        if name not in splits:
            raise ValueError(
                f"{source} has no prepared split {name!r} (it has {sorted(splits)}); prepare it, or pick one of those"
            )
        missing = [column for column in REQUIRED_COLUMNS if column not in splits[name].column_names]
        if missing:
            raise ValueError(
                f"the {name} split of {source} lacks the columns {missing}: it is not in the project's PhraseCut "
                "format (one row per image with its tasks)"
            )
        loaded[name] = splits[name].cast_column("image", datasets.Image(decode=False))
    return loaded
