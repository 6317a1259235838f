"""droppos: pre-train, evaluate and study DropPos Vision Transformers.

Importing this package is cheap (no torch): the CLI imports each stage lazily.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, bad data).

    The CLI prints its message as one line on stderr and exits with status 2;
    stages raise it instead of letting a traceback reach the user.
    """


def check_all(checks: list[tuple[bool, str]]) -> None:
    """Stop at the first failed (condition, message) check with its one-line message."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def error_line(message: object) -> str:
    """The one line a user mistake is reported in: what the message quotes (a path with a newline or a
    terminal escape in it) is shown escaped, so it can neither break the line nor drive the terminal."""
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(message))
    return f"droppos: error: {shown}"
