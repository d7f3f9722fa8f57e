"""What every command-line entry point shares: a mistake on the command line is ONE line on stderr
(what is wrong, then where to look), exit code 2, before any work."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ... (see --help)``) instead of the
    usage block followed by the error."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
