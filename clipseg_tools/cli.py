"""The command-line parser of `run_train.py` and `run_eval.py`."""

from __future__ import annotations

import argparse
import copy
from typing import NoReturn

from .data import default_num_workers


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

    def __init__(self, **kwargs) -> None:
        super().__init__(formatter_class=HelpWithDefaults, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every option)\n")


def worker_count(parser: argparse.ArgumentParser, given: int | None, flag: str) -> int:
    """A data-loader worker flag's value: refused when negative, this machine's default when not given."""
    if given is None:
        return default_num_workers()
    if given < 0:
        parser.error(f"{flag} must not be negative")
    return given
