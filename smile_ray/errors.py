"""The one exception type for user mistakes (bad input, bad configuration, unreachable model).

Command-line entry points catch it and print its message as a single line, exiting with status 2.
"""


class SmileError(ValueError):
    """A user mistake, described in one line that names the field, file or layer at fault."""


def last_line(text: str) -> str:
    """The exception's own message: the last non-empty line (a Ray error's first lines name the actor, a TuneError's
    are a traceback)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
