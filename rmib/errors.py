"""User-facing errors: the CLI prints them without a traceback and exits non-zero."""


class RmibError(Exception):
    """An error the user can cause and fix (bad path, corrupt file, bad value).

    The message names the file or value and says what was expected.
    """


class BadInputError(RmibError):
    """A data file that cannot be used (missing, corrupt, wrong size, too large).

    Args:
        path: the offending file.
        reason: what is wrong with it and what was expected.
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
