"""The error a command ends on with one sentence instead of a traceback, and its two exit codes.

Library code raises `CommandError` where it finds something a user must act on; the scripts' entry point
(`cli.run_command`) prints its message and exits with its code. Anything else is a bug and keeps its
traceback. This module imports nothing of the project: the dataset package's errors derive from it too.
"""

from __future__ import annotations

BAD_INPUT = 2  # a flag, file, folder or value the user can fix (argparse's own code for a bad flag)
FAILED = 1  # the input was fine, the run could not finish (a push refused, a loss that stays NaN)


class CommandError(Exception):
    """Ends a command with `error: <message>` and `exit_code` (`BAD_INPUT` unless said otherwise)."""

    def __init__(self, message: str, exit_code: int = BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code
