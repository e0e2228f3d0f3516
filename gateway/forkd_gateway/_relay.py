"""Streams relayed between one client session and one sandbox's agent.

A client names its streams with ids of its own connection; the gateway's connection to the agent is shared
by every client of that sandbox, so each relayed stream gets a fresh id there. A relay is that pair of ids
plus one pump task moving the stream's frames across:

- ``DownRelay`` (agent → client: ``exec.start``/``exec.attach`` output, ``files.read``, ``code.run``): the
  pump takes each chunk the agent sent and forwards the same ``bytes`` object (never copied, joined or
  decoded) under the client's id, waiting for the client's credit. The agent's chunk is acknowledged to the
  agent when the pump takes it, so the agent is held back exactly as far as the client is: the gateway has
  at most one window (``MAX_RELAY_WINDOW``) of a stream queued, however slow the client.
- ``UpRelay`` (client → agent: ``files.write_open``): the same in the other direction, within the window the
  agent granted.

``stream.end`` is forwarded after the last chunk, its outcome keys unchanged, except when the sandbox died
under the stream: then the client gets ``error: ["sandbox_not_running", ...]``. A relay whose client goes
away tells the agent to stop (``exec.detach``, ``files.read_abort``, ``files.write_abort``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from forkd import protocol as p
from forkd._transports import TransportClosed

if TYPE_CHECKING:
    from ._sandbox import Sandbox
    from ._session import Session

__all__ = ["DownRelay", "UpRelay", "DOWN_KINDS", "MAX_RELAY_WINDOW", "AGENT_CALL_TIMEOUT"]

log = logging.getLogger("forkd.gateway.relay")

# What the gateway itself may hold of one stream, whatever window the client grants.
MAX_RELAY_WINDOW = p.DEFAULT_WINDOW
# Clean-up calls to an agent (detach, abort, unwatch) give up after this long.
AGENT_CALL_TIMEOUT = 5.0

# Methods that open an agent → client stream, and the agent method that stops one the client abandoned
# (None: the request itself owns the stream; cancelling the request stops it).
DOWN_KINDS = {"exec.start": "exec", "exec.attach": "exec", "files.read": "read", "code.run": "code"}
_STOP_METHOD = {"exec": "exec.detach", "read": "files.read_abort", "code": None}


def outcome(info: dict | None) -> dict:
    """The keys of a ``stream.end`` worth forwarding (never its stream id)."""
    return {k: v for k, v in (info or {}).items() if isinstance(k, str) and k != "stream"}


_pending: set[asyncio.Task] = set()  # background clean-up calls (kept referenced until done)


def _background(coro) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def agent_call(sandbox: Sandbox, method: str, params: dict) -> None:
    """A best-effort clean-up request to an agent (it may be dead already)."""
    if not sandbox.running:
        return
    try:
        await sandbox.conn.request(method, params, timeout=AGENT_CALL_TIMEOUT)
    except p.RpcError as exc:
        log.debug("%s on %s: %s", method, sandbox.id, exc.message)


class DownRelay:
    def __init__(self, session: Session, sandbox: Sandbox, client_id: int, kind: str, window: int) -> None:
        self.session = session
        self.sandbox = sandbox
        self.client_id = client_id
        self.kind = kind
        self.window = window
        self.agent_stream = sandbox.conn.open_inbound(None, min(window, MAX_RELAY_WINDOW))
        self.agent_id = self.agent_stream.id
        self.stopped = False
        self.task: asyncio.Task | None = None
        # code.run's display results arrive as notifications, which Connection hands over in a task of
        # their own: one can be handled after the pump has forwarded the stream's end. So the relay stays
        # findable until the request is answered, and those results still reach the client before it.
        self.answered = kind != "code"
        session.conn.open_outbound(client_id, window)
        session.streams[client_id] = self
        sandbox.streams[self.agent_id] = self

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        conn = self.session.conn
        try:
            async for fd, offset, data in self.agent_stream:
                await conn.send_stream(self.client_id, fd, offset, data)
            if not self.stopped:
                await conn.end_stream(self.client_id, **self._end_info())
        except TransportClosed:
            await self.abandon()  # the client is gone: the agent must stop waiting for its credit
        except p.RpcError:
            pass  # stopped: the client's side of the stream was closed under the send
        except Exception as exc:  # a bug here must not leave the client waiting for an end
            log.exception("relay of stream %d failed", self.client_id)
            await self.abandon()
            with contextlib.suppress(p.RpcError):
                await conn.end_stream(
                    self.client_id, error=[p.ErrorCode.SANDBOX.value, f"relay failed: {exc}"]
                )
        finally:
            self._forget()

    def _end_info(self) -> dict:
        info = outcome(self.agent_stream.end_info)
        err = info.get("error")
        # The agent's own errors are strings or [code, message] it chose; a list with sandbox_unreachable
        # comes from our connection to the agent closing: the sandbox is gone.
        if isinstance(err, list) and not self.sandbox.running:
            info["error"] = self.sandbox.ended_error().to_wire()
        return info

    async def wait(self) -> None:
        if self.task is not None:
            await asyncio.shield(self.task)

    @property
    def ended(self) -> bool:
        """The agent has sent the stream's end (it may still be queued here)."""
        return self.agent_stream.end_info is not None

    async def stop(self) -> None:
        """Stop forwarding, send the client nothing more (no ``stream.end``)."""
        if self.stopped:
            return
        self.stopped = True
        self.session.conn.close_outbound(self.client_id)  # a pump waiting for client credit wakes and stops
        await self.agent_stream.close()
        self._forget()

    async def abandon(self) -> None:
        """Stop, and tell the agent to stop sending (the client no longer reads this stream)."""
        live = not self.ended
        await self.stop()
        method = _STOP_METHOD[self.kind]
        if live and method is not None:
            _background(agent_call(self.sandbox, method, {"stream": self.agent_id}))

    def answer(self) -> None:
        """The request that opened the stream has been answered."""
        self.answered = True
        if self.stopped or (self.task is not None and self.task.done()):
            self._forget()

    def _forget(self) -> None:
        if self.session.streams.get(self.client_id) is self:
            del self.session.streams[self.client_id]
        if self.answered and self.sandbox.streams.get(self.agent_id) is self:
            del self.sandbox.streams[self.agent_id]


class UpRelay:
    """Client → agent (a streamed file write). Stays registered until write_close / write_abort."""

    kind = "write"

    def __init__(self, session: Session, sandbox: Sandbox, client_id: int, agent_id: int) -> None:
        self.session = session
        self.sandbox = sandbox
        self.client_id = client_id
        self.agent_id = agent_id
        self.client_stream = None
        self.task: asyncio.Task | None = None
        self.closing = False
        session.streams[client_id] = self
        sandbox.streams[agent_id] = self

    def open(self, window: int) -> None:
        """Once the agent granted ``window``: accept the client's frames and start forwarding them."""
        self.client_stream = self.session.conn.open_inbound(self.client_id, window)
        self.sandbox.conn.open_outbound(self.agent_id, window)
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        agent = self.sandbox.conn
        failed = False
        async for fd, offset, data in self.client_stream:
            if failed:
                continue  # keep taking (and acknowledging) the client's frames: it must never stall
            try:
                await agent.send_stream(self.agent_id, fd, offset, data)
            except p.RpcError:
                failed = True  # the sandbox is gone or the write was aborted; write_close reports it
        end = self.client_stream.end_info or {}
        if failed or end.get("closed"):
            return  # nothing to forward, or closed here by write_close / write_abort
        if self.session.conn.closed.is_set():
            return  # the client went away: the session's clean-up aborts the write
        # The client ended the stream itself (stream.end, maybe with an error that aborts the write).
        with contextlib.suppress(p.RpcError):
            await agent.end_stream(self.agent_id, **outcome(end))

    async def finish(self) -> None:
        """Forward every frame the client sent before now, then stop taking more (write_close)."""
        self.closing = True
        if self.client_stream is not None:
            await self.client_stream.close()
        if self.task is not None:
            await asyncio.shield(self.task)

    async def abort(self) -> None:
        self.closing = True
        if self.client_stream is not None:
            await self.client_stream.close()
        self.sandbox.conn.close_outbound(self.agent_id)  # a pump waiting for the agent's credit stops
        if self.task is not None:
            with contextlib.suppress(p.RpcError):
                await asyncio.shield(self.task)

    async def abandon(self) -> None:
        await self.abort()
        self.forget()
        _background(agent_call(self.sandbox, "files.write_abort", {"stream": self.agent_id}))

    def forget(self) -> None:
        if self.session.streams.get(self.client_id) is self:
            del self.session.streams[self.client_id]
        if self.sandbox.streams.get(self.agent_id) is self:
            del self.sandbox.streams[self.agent_id]
