"""The one subprocess helper: argv lists, explicit environment, timeouts, stderr kept for errors.

Commands are logged with `shlex.join` at debug level; any `Secret` in an argv prints as ***.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ai_sandbox.errors import CommandError

log = logging.getLogger(__name__)


class Secret(str):
    """A string that never shows itself in reprs, logs or rendered commands."""

    def __repr__(self) -> str:
        return "'***'"

    def masked(self) -> str:
        return "***"


def render(argv: Sequence[str]) -> str:
    """Shell-quoted command line with secrets masked."""
    return shlex.join("***" if isinstance(a, Secret) else str(a) for a in argv)


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def _env(env: Mapping[str, str] | None, extra: Mapping[str, str] | None) -> dict[str, str] | None:
    if env is None and extra is None:
        return None
    base = dict(os.environ if env is None else env)
    base.update(extra or {})
    return base


def _describe(returncode: int) -> str:
    if returncode == 127:
        return "not found"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    log_file: Path | None = None,
    stdout_file: Path | None = None,
    capture: bool = True,
) -> Result:
    """Run argv to completion.

    With `log_file`, stdout and stderr are appended there (long build steps); with `stdout_file`, stdout is
    written there (binary output) and stderr kept for the error message.
    """
    args = [str(a) if not isinstance(a, str) else a for a in argv]
    log.debug("+ %s", render(args))
    kwargs: dict = {
        "env": _env(env, extra_env),
        "cwd": cwd,
        "timeout": timeout,
    }
    if input is None:
        kwargs["stdin"] = subprocess.DEVNULL
    else:
        kwargs["input"] = input.encode() if isinstance(input, str) else input
    try:
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("ab") as fh:
                fh.write(f"+ {render(args)}\n".encode())
                fh.flush()
                proc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, **kwargs)
            out, err = "", _tail(log_file)
        elif stdout_file is not None:
            with stdout_file.open("wb") as fh:
                proc = subprocess.run(args, stdout=fh, stderr=subprocess.PIPE, **kwargs)
            out, err = "", proc.stderr.decode(errors="replace")
        elif capture:
            proc = subprocess.run(args, capture_output=True, **kwargs)
            out = proc.stdout.decode(errors="replace")
            err = proc.stderr.decode(errors="replace")
        else:
            proc = subprocess.run(args, **kwargs)
            out, err = "", ""
    except FileNotFoundError as e:
        raise CommandError(args, 127, "", f"{args[0]}: command not found") from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(args, -9, "", f"{args[0]} timed out after {timeout:g}s") from e
    result = Result(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        tail = err.strip().splitlines()[-1] if err.strip() else ""
        msg = f"{os.path.basename(args[0])} failed ({_describe(proc.returncode)})" + (f": {tail}" if tail else "")
        raise CommandError(args, proc.returncode, err, msg)
    return result


def _tail(path: Path, size: int = 4096) -> str:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - size))
        return fh.read().decode(errors="replace")


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived helper (VMM, virtiofsd) in its own session, output to `log_file`."""
    args = [str(a) if not isinstance(a, str) else a for a in argv]
    log.debug("& %s", render(args))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as fh:
        fh.write(f"+ {render(args)}\n".encode())
        fh.flush()
        try:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=_env(env, extra_env),
                pass_fds=tuple(pass_fds),
                cwd=cwd,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            raise CommandError(args, 127, "", f"{args[0]}: command not found") from e


def exec_replace(argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Replace this process (interactive ssh attach keeps the real terminal)."""
    log.debug("exec %s", render(argv))
    os.execvpe(argv[0], list(argv), dict(env or os.environ))


def interactive(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run with the caller's terminal attached; return the exit status."""
    log.debug("+ %s", render(argv))
    try:
        return subprocess.run(list(argv), env=dict(env) if env else None).returncode
    except FileNotFoundError as e:
        raise CommandError(list(argv), 127, "", f"{argv[0]}: command not found") from e
