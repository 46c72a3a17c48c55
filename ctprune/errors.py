"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class CtpruneError(Exception):
    """Bad input or state a user can fix; the message says what was wrong and what is allowed.
    It is one line whatever it quotes: a line break (in a path, a key) is shown as ``\\n``."""

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message).replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(text, *args)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error becomes one line)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
