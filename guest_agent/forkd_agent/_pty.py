"""Pseudo-terminals for interactive processes."""

from __future__ import annotations

import fcntl
import os
import struct
import termios

from forkd.protocol import ErrorCode, RpcError

__all__ = ["DEFAULT_ROWS", "DEFAULT_COLS", "check_size", "open_pty", "set_size", "become_controlling_tty"]

# A 0x0 terminal makes full-screen programs divide by zero or print nothing;
# 80x24 is what every terminal program assumes when it knows nothing better.
DEFAULT_ROWS = 24
DEFAULT_COLS = 80
_MAX = 0xFFFF  # struct winsize holds unsigned shorts


def check_size(rows: object, cols: object) -> tuple[int, int]:
    for name, value in (("rows", rows), ("cols", cols)):
        if type(value) is not int or not 1 <= value <= _MAX:
            raise RpcError(
                ErrorCode.INVALID_ARGUMENT, f"pty {name} must be an integer in 1..{_MAX}, not {value!r}"
            )
    return rows, cols  # type: ignore[return-value]


def set_size(fd: int, rows: int, cols: int) -> None:
    # The kernel sends SIGWINCH to the terminal's foreground process group.
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_pty(rows: int, cols: int, owner: int | None = None) -> tuple[int, int]:
    """(master, slave) with the given window size; master is non-blocking."""
    master, slave = os.openpty()
    try:
        set_size(master, rows, cols)
        os.set_blocking(master, False)
        if owner is not None:
            # Programs that reopen their terminal by name (sudo, ssh, script)
            # need to own it, as they would after a real login.
            try:
                os.fchown(slave, owner, -1)
            except OSError:
                pass
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def become_controlling_tty() -> None:
    """Runs in the child after setsid(): make stdin (the slave) its controlling
    terminal, so job control, Ctrl-C and /dev/tty work."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
