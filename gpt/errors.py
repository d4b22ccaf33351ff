"""The one exception type for mistakes a user can fix (a bad config, a missing file, ...).

The scripts catch `UserError` and print its message on one line with a non-zero exit code, so
a typo never ends in a Python traceback. Anything else escaping is a bug in this project.
"""

import argparse
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of `error`'s message (its type's name if it has none), at most `limit` characters:
    what a one-line error quotes of a library's exception."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def run_cli(action: Callable[[], int | None], rank: int = 0) -> int:
    """Run a script's work: its own exit code (None is 0), or 2 and one `error:` line, or 130 on Ctrl-C.

    `rank` is the process's rank under torchrun: ranks other than 0 name themselves in the line.
    """
    try:
        return action() or 0
    except UserError as e:
        print(f"error: [rank {rank}] {e}" if rank else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line gives one `error:` line (not usage + error) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")
