"""The one exception type for user mistakes (bad input, bad configuration, unreachable model).

Command-line entry points catch it and print its message as a single line, exiting with status 2.
"""


class SmileError(ValueError):
    """A user mistake, described in one line that names the field, file or layer at fault."""
