"""Argument parsing pieces shared by every command line of the project."""

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes print one line naming the flag (not the whole usage block), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
