"""The one exception type users see: a one-line message naming the file and the problem."""


class HistosynthError(Exception):
    """A user-facing error; the CLI prints ``error: <message>`` and exits with status 2, no traceback."""

    def __init__(self, message: str):
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)
