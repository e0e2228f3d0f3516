"""The data classes of the E2B surface: sandboxes, commands, files.

Field names, order, defaults and types follow E2B's (``e2b`` 2.63), so code that
builds, compares or pattern-matches them keeps working. The ``_from_wire``
helpers turn the gateway's msgpack maps into them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ._exceptions import SandboxException

__all__ = [
    "SandboxState",
    "SandboxInfo",
    "SandboxQuery",
    "SandboxListOrder",
    "SandboxMetrics",
    "SnapshotInfo",
    "SnapshotMode",
    "BranchReport",
    "Stdout",
    "Stderr",
    "PtyOutput",
    "PtySize",
    "CommandResult",
    "CommandExitException",
    "ProcessInfo",
    "FileType",
    "WriteInfo",
    "EntryInfo",
    "FilesystemEventType",
    "FilesystemEvent",
]

Stdout = str
Stderr = str
PtyOutput = bytes
SandboxListOrder = Literal["asc", "desc"]
# What a snapshot keeps (E2B's option): forkd always keeps everything the backend can carry ("full").
SnapshotMode = Literal["full", "filesystem"]


def _datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return datetime.fromtimestamp(0, tz=UTC)


# -- sandboxes -----------------------------------------------------------------


class SandboxState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"


@dataclass
class SandboxInfo:
    """Information about a sandbox."""

    sandbox_id: str
    sandbox_domain: str | None
    template_id: str
    name: str | None
    metadata: dict[str, str]
    started_at: datetime
    end_at: datetime
    state: SandboxState
    cpu_count: int
    memory_mb: int
    envd_version: str
    allow_internet_access: bool | None = None
    network: dict | None = None
    lifecycle: dict | None = None
    volume_mounts: list[dict[str, str]] = field(default_factory=list)
    envd_unresponsive_at_pause: bool | None = None

    @classmethod
    def _from_wire(cls, d: dict) -> SandboxInfo:
        state = d.get("state") or "running"
        try:
            state = SandboxState(state)
        except ValueError:
            pass
        return cls(
            sandbox_id=d["sandbox_id"],
            sandbox_domain=d.get("sandbox_domain"),
            template_id=d.get("template_id") or "",
            name=d.get("name"),
            metadata=dict(d.get("metadata") or {}),
            started_at=_datetime(d.get("started_at")),
            end_at=_datetime(d.get("end_at")),
            state=state,
            cpu_count=int(d.get("cpu_count") or 0),
            memory_mb=int(d.get("memory_mb") or 0),
            envd_version=str(d.get("envd_version") or d.get("agent_version") or "forkd"),
            allow_internet_access=d.get("allow_internet_access"),
        )


@dataclass
class SandboxQuery:
    """Filters of ``Sandbox.list``: sandboxes whose metadata contains every pair, in one of the states."""

    metadata: dict[str, str] | None = None
    state: list[SandboxState] | None = None
    started_after: datetime | None = None
    template: str | None = None


@dataclass
class SandboxMetrics:
    cpu_count: int
    cpu_used_pct: float
    disk_total: int
    disk_used: int
    mem_total: int
    mem_used: int
    mem_cache: int
    timestamp: datetime


@dataclass
class SnapshotInfo:
    """A snapshot (``create_snapshot``, ``list_snapshots``): start sandboxes from it with
    ``Sandbox.create(template=snapshot_id)`` (or one of its ``names``).

    ``snapshot_id`` and ``names`` are E2B's; the rest are forkd's: the sandbox it was taken
    from, that sandbox's template, when, and the capture's report (see ``BranchReport``).
    """

    snapshot_id: str
    names: list[str] = field(default_factory=list)
    sandbox_id: str | None = None
    template_id: str | None = None
    created_at: datetime | None = None
    report: BranchReport | None = None

    @classmethod
    def _from_wire(cls, d: dict) -> SnapshotInfo:
        return cls(
            snapshot_id=d["snapshot_id"],
            names=list(d.get("names") or []),
            sandbox_id=d.get("sandbox_id"),
            template_id=d.get("template_id"),
            created_at=_datetime(d["created_at"]) if d.get("created_at") is not None else None,
            report=BranchReport._from_wire(d),
        )


@dataclass
class BranchReport:
    """forkd extension: what a BRANCH (``fork``, ``branch``, ``create_snapshot``) captured.

    ``pause_ms``: how long the source sandbox was stopped; ``inherited``: what the new
    sandboxes carry over (e.g. ``"files"``, ``"code contexts"``, ``"memory"``);
    ``not_inherited``: what they do not, as ``{"what": ..., "why": ...}`` maps (the process
    backend, for one, does not carry running processes).
    """

    pause_ms: float = 0.0
    inherited: list[str] = field(default_factory=list)
    not_inherited: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def _from_wire(cls, d: dict) -> BranchReport:
        return cls(
            pause_ms=float(d.get("pause_ms") or 0.0),
            inherited=[str(x) for x in d.get("inherited") or []],
            not_inherited=[dict(x) for x in d.get("not_inherited") or [] if isinstance(x, dict)],
        )


# -- commands ------------------------------------------------------------------


@dataclass
class PtySize:
    """Pseudo-terminal size."""

    rows: int
    cols: int


@dataclass
class CommandResult:
    """What a finished command produced (``stdout``/``stderr`` are None with ``retain_output=False``)."""

    stderr: str
    stdout: str
    exit_code: int
    error: str | None


@dataclass
class CommandExitException(SandboxException, CommandResult):  # type: ignore[misc]
    """Raised by a foreground ``commands.run`` (and ``handle.wait()``) when the exit code is not 0.

    It is also a ``CommandResult``: ``stdout``, ``stderr``, ``exit_code`` and ``error`` are there.
    """

    # Not a dataclass field: the generated __init__ never calls SandboxException's.
    status_code = None

    def __str__(self) -> str:
        if self.stderr is None:
            return f"Command exited with code {self.exit_code}"
        return f"Command exited with code {self.exit_code} and error:\n{self.stderr}"

    # Exceptions must stay hashable (tracebacks and logging put them in sets).
    __hash__ = object.__hash__


@dataclass
class ProcessInfo:
    """A running command or PTY session."""

    pid: int
    tag: str | None
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None

    @classmethod
    def _from_wire(cls, d: dict) -> ProcessInfo:
        # E2B reports commands as what envd ran: bash with the command line as arguments.
        if d.get("pty"):
            args = ["-i", "-l"] if not d.get("cmd") else ["-l", "-c", d["cmd"]]
        else:
            args = ["-l", "-c", d.get("cmd") or ""]
        return cls(
            pid=d["pid"],
            tag=d.get("tag"),
            cmd="/bin/bash",
            args=args,
            envs=dict(d.get("envs") or {}),
            cwd=d.get("cwd"),
        )


# -- files ---------------------------------------------------------------------


class FileType(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


def _file_type(value: Any) -> FileType | None:
    try:
        return FileType(value)
    except ValueError:
        return None


@dataclass
class WriteInfo:
    """A written file."""

    name: str
    type: FileType | None
    path: str
    metadata: dict[str, str] | None = field(default=None, kw_only=True)

    @classmethod
    def _from_wire(cls, d: dict) -> WriteInfo:
        return cls(name=d["name"], type=_file_type(d.get("type")), path=d["path"])


@dataclass
class EntryInfo(WriteInfo):
    """A file, directory or symlink, as ``files.get_info`` and ``files.list`` report it."""

    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    modified_time: datetime
    symlink_target: str | None = None

    @classmethod
    def _from_wire(cls, d: dict) -> EntryInfo:
        return cls(
            name=d["name"],
            type=_file_type(d.get("type")),
            path=d["path"],
            size=d.get("size", 0),
            mode=d.get("mode", 0),
            permissions=d.get("permissions", ""),
            owner=d.get("owner", ""),
            group=d.get("group", ""),
            modified_time=_datetime(d.get("modified_time")),
            symlink_target=d.get("symlink_target"),
        )


class FilesystemEventType(enum.Enum):
    CHMOD = "chmod"
    CREATE = "create"
    REMOVE = "remove"
    RENAME = "rename"
    WRITE = "write"


@dataclass
class FilesystemEvent:
    """One change in a watched directory: ``name`` is relative to it."""

    name: str
    type: FilesystemEventType
    entry: EntryInfo | None = None
