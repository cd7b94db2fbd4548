"""The one exception type for mistakes a user can fix (bad path, bad option, bad input data)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line, without a traceback.

    The message says what is wrong, where (file, key, row) and what to do about it.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what if where is None else f"{where}: {what}"]
        if fix:
            parts.append(fix)
        super().__init__(" — ".join(parts))
