"""What every command-line entry point shares: a mistake on the command line is ONE line on stderr
(what is wrong, then where to look), exit code 2, before any work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ... (see --help)``) instead of the
    usage block followed by the error."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def run(main: Callable[[], object], prog: str) -> None:
    """Runs ``main()`` as a command: a ValueError or FileNotFoundError (bad input, raised before any
    work) is one line ``prog: error: ...`` on stderr and exit code 2; an int result is the exit code."""
    try:
        result = main()
    except (ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int):
        sys.exit(result)
