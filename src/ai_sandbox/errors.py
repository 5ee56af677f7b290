"""One error tree. Only the CLI maps these to exit codes and prints them."""

from __future__ import annotations


class SandboxError(Exception):
    """A failure the user can understand: a one-line message, an optional hint, an exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, log: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.log = log

    def line(self) -> str:
        parts = [self.message]
        if self.log:
            parts.append(f"see {self.log}")
        if self.hint:
            parts.append(self.hint)
        return "; ".join(parts)


class UsageError(SandboxError):
    """Bad input: a setting, a name, a path, a recipe."""

    exit_code = 2


class BuildError(SandboxError):
    """An image build step failed."""

    exit_code = 2


class CommandError(SandboxError):
    """An external program failed."""

    def __init__(self, argv: list[str], returncode: int, stderr: str, message: str | None = None) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(message or f"{argv[0]} failed (exit {returncode}){': ' + tail if tail else ''}")


class VMError(SandboxError):
    """A VMM failed to start, answer or stop."""


class NotFound(UsageError):
    """An unknown sandbox, recipe or file."""
