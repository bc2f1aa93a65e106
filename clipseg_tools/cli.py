"""What the command lines share: the argument parser, the error policy, and the logging style. It imports
nothing of the project but its errors (the dataset package's commands use it too).

Error policy: a wrong flag ends at parsing (argparse, exit code 2); bad input found later (a data file, a
model folder) raises `CommandError`, and a run that cannot finish raises it with `FAILED` (exit code 1):
`run_command` prints its one sentence, no traceback. Anything else is a bug and keeps its traceback.

Logging: one line per event, `time level name: message` on stdout, written between progress bars (never glued
onto one), from the main process only unless it is a warning; libraries' own bars for saving and loading
weights are off.
"""

from __future__ import annotations

import argparse
import copy
import errno
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from tqdm.auto import tqdm

from .errors import FAILED, CommandError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class HelpWithDefaults(argparse.HelpFormatter):
    """`--help` shows each option's default, where it has one worth showing, also for options with no text."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shown_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shown_default(action) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _shown_default(action: argparse.Action) -> bool:
    default = action.default
    hidden = default is None or default is False or default == argparse.SUPPRESS or default == []
    return bool(action.option_strings) and not hidden


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one sentence and a pointer to `--help`: the whole usage of some fifty
    options, printed first, would bury the sentence."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=HelpWithDefaults, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every option)\n")


def worker_count(parser: argparse.ArgumentParser, given: int | None, flag: str) -> int:
    """A data-loader worker flag's value: refused when negative, this machine's default when not given."""
    if given is None:
        from .loader import default_num_workers  # here: the dataset package's commands need no torch

        return default_num_workers()
    if given < 0:
        parser.error(f"{flag} must not be negative")
    return given


def run_command(main: Callable[[], Any]) -> None:
    """Run a script's `main`; a `CommandError` ends it with its sentence on stderr and its exit code, and so
    does a full disk or shared memory (`out_of_space`)."""
    try:
        main()
    except CommandError as error:
        message = str(error)
        if "\nOriginal Traceback" in message:  # raised in a data-loader worker: its sentence is the last line
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        tqdm.write(f"error: {message}", file=sys.stderr)  # on a line of its own, below any progress bar
        sys.exit(error.exit_code)
    except Exception as error:
        message = out_of_space(error)
        if message is None:
            raise
        tqdm.write(f"error: {message}", file=sys.stderr)  # on a line of its own, below any progress bar
        sys.exit(FAILED)


def written(error: BaseException) -> bool:
    """torch.save's way of saying that a write failed (a full disk, mostly): a C++ stream error."""
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "PytorchStreamWriter" in text or "inline_container.cc" in text
    )


def out_of_space(error: BaseException) -> str | None:
    """One sentence for a full disk or a full shared memory (`/dev/shm`, where data-loader workers hand their
    batches over), which otherwise surface as a C++ stream error or a worker's traceback (or as the cause of
    another error, such as a data set's preparation failing); None for others."""
    causes = [error]
    while causes[-1].__cause__ is not None and len(causes) < 10:
        causes.append(causes[-1].__cause__)
    return next((said for said in map(_out_of_space, causes) if said), None)


def _out_of_space(error: BaseException) -> str | None:
    text = str(error)
    if "shared memory" in text or "/dev/shm" in text or "torch_" in text and "No space left" in text:
        return (
            "shared memory (/dev/shm) is full or too small for the data-loader workers' batches: give the "
            "machine (or container: docker run --shm-size 8g) more, or pass --dataloader_num_workers 0"
        )
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in text or written(error):
        where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
        return (
            f"the disk is full{where} ({text.splitlines()[0][:200]}): free space and run again (a training run "
            "continues from its last checkpoint with --resume_from_checkpoint latest)"
        )
    return None


class _BetweenBars(logging.Handler):
    """Writes each record on its own line above the progress bars (`tqdm.write`), on stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # logging must never end a run
            self.handleError(record)


def setup_logging(main_process: bool = True) -> None:
    """The project's logging style for a script (see the module's docstring)."""
    import datasets
    import transformers

    handler = _BetweenBars()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _BetweenBars)] + [handler]
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # a line per file of every checkpoint
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    if not main_process:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 process', '2 processes', '1,200 images'."""
    word = noun if count == 1 else plural_form or f"{noun}s"
    return f"{count:,} {word}"
