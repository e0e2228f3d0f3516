"""What ``exec.start`` runs: its params checked and turned into a ``Spec``
(argv, environment, user, working directory, terminal size)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from forkd.protocol import ErrorCode, RpcError

from . import _params as params_
from . import _pty
from ._users import User, resolve_path, resolve_user

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Spec:
    cmd: str
    envs: dict[str, str]
    user: User
    cwd: str
    stdin: bool
    timeout: float
    tag: str | None
    pty: tuple[int, int] | None  # (rows, cols)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _parse_pty(params: dict) -> tuple[int, int] | None:
    value = params.get("pty")
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise RpcError(ErrorCode.INVALID_ARGUMENT, "parameter 'pty' must be a map {rows, cols}")
    # Absent or 0 means "unknown": use the default rather than a 0x0 terminal.
    rows = value.get("rows") or _pty.DEFAULT_ROWS
    cols = value.get("cols") or _pty.DEFAULT_COLS
    return _pty.check_size(rows, cols)


def _check_envs(envs: dict[str, str]) -> None:
    for k, v in envs.items():
        if not k or "=" in k or "\x00" in k:
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"invalid environment variable name {k!r}")
        if "\x00" in v:
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"environment variable {k} contains a NUL byte")


def _resolve_cwd(raw: str | None, user: User) -> str:
    if raw is None or raw == "":
        # A missing home (system users, bare images) should not make every
        # command fail; bash copes with any directory.
        return user.home if os.path.isdir(user.home) else "/"
    cwd = resolve_path(raw, user)
    if not os.path.exists(cwd):
        raise RpcError(ErrorCode.FILE_NOT_FOUND, f"working directory '{cwd}' does not exist")
    if not os.path.isdir(cwd):
        raise RpcError(ErrorCode.INVALID_ARGUMENT, f"working directory '{cwd}' is not a directory")
    return cwd


def parse_spec(agent, params: dict) -> Spec:
    pty = _parse_pty(params)
    # Without a command a terminal runs an interactive login shell.
    cmd = params_.get(params, "cmd", str, "") if pty else params_.get(params, "cmd", str)
    if "\x00" in cmd:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, "cmd contains a NUL byte")
    envs = params_.get_str_map(params, "envs")
    _check_envs(envs)
    timeout = params_.get_number(params, "timeout", 0.0)
    if not math.isfinite(timeout) or timeout < 0:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, "parameter 'timeout' must be a number >= 0 (0 = no limit)")
    user = resolve_user(params_.get(params, "user", str, None))
    cwd = _resolve_cwd(params_.get(params, "cwd", str, None), user)
    spec = Spec(
        cmd=cmd,
        envs=dict(envs),
        user=user,
        cwd=cwd,
        stdin=bool(params_.get(params, "stdin", bool, False)),
        timeout=timeout,
        tag=params_.get(params, "tag", str, None),
        pty=pty,
    )
    shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
    if pty and not cmd:
        spec.argv = [shell, "-i", "-l"] if shell == "/bin/bash" else [shell, "-i"]
    else:
        spec.argv = [shell, "-l", "-c", cmd] if shell == "/bin/bash" else [shell, "-c", cmd]
    env = {
        "PATH": os.environ.get("PATH") or _DEFAULT_PATH,
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": user.shell,
        "LANG": "C.UTF-8",
        "PWD": cwd,
        # Read now, not at import: an identity refresh (fork of a sandbox) changes it.
        "FORKD_SANDBOX_ID": agent.sandbox_id,
        "E2B_SANDBOX_ID": agent.sandbox_id,
    }
    if pty:
        env["TERM"] = "xterm-256color"
    env.update(envs)
    spec.env = env
    return spec


def spawn_error(exc: Exception, spec: Spec) -> RpcError:
    where = f"as user '{spec.user.name}' in '{spec.cwd}'"
    if isinstance(exc, FileNotFoundError):
        return RpcError(ErrorCode.FILE_NOT_FOUND, f"cannot start the command {where}: {exc}")
    if isinstance(exc, (PermissionError, ValueError)):
        return RpcError(ErrorCode.INVALID_ARGUMENT, f"cannot start the command {where}: {exc}")
    return RpcError(ErrorCode.SANDBOX, f"cannot start the command {where}: {exc}")
