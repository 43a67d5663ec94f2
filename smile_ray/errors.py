"""The one exception type for user mistakes (bad input, bad configuration, unreachable model).

Command-line entry points catch it and print its message as a single line, exiting with status 2.
"""
import re

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


_CREDENTIALS = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def without_credentials(text: str) -> str:
    """`text` with the user and password of every URI in it left out (https://user:token@host/ → https://host/),
    for messages and logs."""
    return _CREDENTIALS.sub(r"\1", text)


class SmileError(ValueError):
    """A user mistake, described in one line that names the field, file or layer at fault."""


class OutputFull(Exception):
    """A sweep stopped, resumable, because its --output's file system fell below the free space it keeps (one line;
    not a user mistake: `smile_ray.tune` exits with status 1)."""


def last_line(text: str) -> str:
    """The exception's own message: the last non-empty line (a Ray error's first lines name the actor, a TuneError's
    are a traceback), without terminal colour codes."""
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def user_message(error: BaseException) -> str:
    """One line for the user. An error raised inside a Ray task or actor is shown as the error it raised there (Ray
    wraps it with the remote traceback); a message that holds a traceback (Tune's) by its last line; any other by its
    first (SQLAlchemy's second line is only a link). No colour codes, no credentials."""
    cause = getattr(error, "cause", None)                      # ray.exceptions.RayTaskError / RayActorError
    text = without_credentials(ANSI_ESCAPE.sub("", str(cause if isinstance(cause, BaseException) else error)))
    if "Traceback (most recent call last)" in text:
        return last_line(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
