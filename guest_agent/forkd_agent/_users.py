"""Who a request acts as, and where its relative paths point.

E2B's default user is ``user`` (home /home/user); forkd uses it when it exists
in the sandbox and falls back to the agent's own user otherwise (e.g. when the
agent runs on a developer's host in tests).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from forkd.protocol import ErrorCode, RpcError

DEFAULT_USER = "user"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @property
    def is_self(self) -> bool:
        """True when acting as this user needs no privilege change."""
        return self.uid == os.geteuid()

    def groups(self) -> list[int]:
        return list(_cached(_groups_cache, (self.name, self.gid), "/etc/group", self._lookup_groups))

    def _lookup_groups(self) -> tuple[int, ...]:
        try:
            return tuple(os.getgrouplist(self.name, self.gid))
        except OSError:
            return (self.gid,)


# Every command and file request names a user: looking one up reads and parses
# /etc/passwd (/etc/group for the groups), ~0.2 ms on a cold cache. The answers
# are kept until the file changes (useradd replaces it: new inode, size, mtime).
_users_cache: dict[str | None, tuple[tuple, User]] = {}
_groups_cache: dict[tuple[str, int], tuple[tuple, tuple[int, ...]]] = {}


def _cached(cache: dict, key, path: str, lookup):
    """``lookup()``, or its earlier answer for ``key`` while ``path`` is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return lookup()
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = lookup()
    cache[key] = (stamp, value)
    return value


def _from_pw(pw: pwd.struct_passwd) -> User:
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir or "/", pw.pw_shell or "/bin/sh")


def resolve_user(name: str | None) -> User:
    """The named user, or the default one; an unknown name is the caller's error."""
    return _cached(_users_cache, name or None, "/etc/passwd", lambda: _lookup(name))


def _lookup(name: str | None) -> User:
    if name:
        try:
            return _from_pw(pwd.getpwnam(name))
        except KeyError:
            raise RpcError(
                ErrorCode.INVALID_ARGUMENT, f"user '{name}' does not exist in the sandbox"
            ) from None
    try:
        return _from_pw(pwd.getpwnam(DEFAULT_USER))
    except KeyError:
        try:
            return _from_pw(pwd.getpwuid(os.geteuid()))
        except KeyError:  # no passwd entry at all (bare container)
            return User(str(os.geteuid()), os.geteuid(), os.getegid(), os.environ.get("HOME", "/"), "/bin/sh")


def resolve_path(path: str, user: User) -> str:
    """Absolute, normalised path; relative paths are relative to the user's home."""
    if not isinstance(path, str) or not path:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, "path must be a non-empty string")
    if "\x00" in path:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, "path contains a NUL byte")
    if path.startswith("~"):
        path = user.home + path[1:]
    if not os.path.isabs(path):
        path = os.path.join(user.home, path)
    return os.path.normpath(path)
