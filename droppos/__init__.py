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
