"""droppos: pre-train, evaluate and study DropPos Vision Transformers.

Importing this package is cheap (no torch): the CLI imports each stage lazily.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, bad data).

    The CLI prints its message as one line on stderr and exits with status 2;
    stages raise it instead of letting a traceback reach the user.
    """
