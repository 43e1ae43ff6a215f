"""What the command lines share: bad input ends in one `error:` line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

BAD_INPUT = 2


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def fail(message: object) -> int:
    """Print `error: <message>` as one line on stderr; the exit status of bad input."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the flag, without the usage text."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)")
        sys.exit(BAD_INPUT)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value
