"""Exceptions that the CLI turns into a one-line message and an exit code."""


class FcvmError(Exception):
    """An error the user can act on. The message names the problem and, where known, the fix."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} ({self.hint})" if self.hint else base


class UsageError(FcvmError):
    exit_code = 2


class NotFoundError(FcvmError):
    exit_code = 1
