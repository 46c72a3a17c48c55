"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class CtpruneError(Exception):
    """Bad input or state a user can fix; the message says what was wrong and what is allowed."""
