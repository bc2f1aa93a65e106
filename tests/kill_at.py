"""Run `run_train.py` and kill it (os._exit, as SIGKILL would: no cleanup, no flushing) at one point of a
checkpoint save or of the final save:

    python tests/kill_at.py POINT run_train.py-arguments...

"half:NAME@WHERE": the file NAME is written, then cut to half its size, then the process dies (a kill in the
middle of writing it), when its path contains WHERE. "before_rename:NAME" / "after_rename:NAME": around the
rename that gives NAME its place. "remove_old": halfway through removing an old checkpoint. "before_eval":
after the final save, before the final evaluation. "merge:N": after N entries of the saved model were moved
into the output folder.
"""

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def die() -> None:
    sys.stdout.flush()
    os._exit(9)


def cut_after(write, name: str, where: str, path_of):
    """`write`, and for NAME under WHERE: then cut the file to half and die."""

    def written(*args, **kwargs):
        result = write(*args, **kwargs)
        path = Path(str(path_of(*args, **kwargs)))
        if path.name == name and where in str(path):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            die()
        return result

    return written


def install(point: str) -> None:
    import accelerate.utils.other
    import torch
    import transformers.modeling_utils

    import run_train
    from clipseg_tools import files

    kind, _, what = point.partition(":")
    if kind == "half":
        name, _, where = what.partition("@")
        torch.save = cut_after(torch.save, name, where, lambda obj, f, *a, **k: f)
        accelerate.utils.other.safe_save_file = cut_after(
            accelerate.utils.other.safe_save_file, name, where, lambda obj, f, *a, **k: f
        )
        transformers.modeling_utils.safe_save_file = cut_after(
            transformers.modeling_utils.safe_save_file, name, where, lambda obj, f, *a, **k: f
        )
        Path.write_text = cut_after(Path.write_text, name, where, lambda self, *a, **k: self)
    elif kind in ("before_rename", "after_rename"):
        replace = os.replace

        def renamed(source, target):
            if Path(target).name == what and kind == "before_rename":
                die()
            replace(source, target)
            if Path(target).name == what:
                die()

        files.os.replace = renamed
    elif kind == "merge":
        moved, replace = [], os.replace

        def merged(source, target):
            replace(source, target)
            if Path(source).parent.name == ".partial":
                moved.append(target)
                if len(moved) == int(what):
                    die()

        files.os.replace = merged
    elif kind == "remove_old":
        rmtree = shutil.rmtree

        def removed(path, *args, **kwargs):
            entries = sorted(Path(path).iterdir()) if Path(path).is_dir() else []
            if Path(path).name.startswith("step_") and entries:
                for entry in entries[: len(entries) // 2]:
                    entry.unlink()
                die()
            rmtree(path, *args, **kwargs)

        shutil.rmtree = removed
    elif kind == "before_eval":
        evaluate = run_train.run_evaluation

        def evaluation(*args, **kwargs):
            if kwargs.get("description", args[-1] if args else "") == "final evaluation":
                die()
            return evaluate(*args, **kwargs)

        run_train.run_evaluation = evaluation
    else:
        raise SystemExit(f"unknown point {point}")


if __name__ == "__main__":
    install(sys.argv[1])
    import run_train
    from clipseg_tools.cli import run_command

    sys.argv = ["run_train.py", *sys.argv[2:]]
    run_command(run_train.main)
