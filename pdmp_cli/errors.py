"""The one exception type users see: a one-line message that names the problem and the fix."""


class PdmpError(Exception):
    """Raised for bad input or state; the CLI prints it on one line and exits with code 2."""
