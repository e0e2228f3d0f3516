"""One client connection to the gateway.

States: ``AWAIT_HELLO`` → (``hello`` with a version we speak) → ``OPEN`` → (transport closed) → ``CLOSED``.
Only ``hello`` and ``ping`` are answered before ``OPEN``. Requests run concurrently (each as its own task,
see forkd._connection); an explicit ``cancel`` cancels the handler, and a relayed request's cancellation
becomes a ``cancel`` to the agent.

Calls into a sandbox carry ``sandbox_id``: the session checks ownership through the gateway, removes the id,
merges the sandbox's default ``envs``, maps stream ids (see _relay) and relays the request to the sandbox's
agent; the response comes back unchanged. Watches are remembered so that ``files.event`` reaches only the
session that created the watch.

When the client goes away the session stops its relays (telling agents to stop sending), removes its
watches and kills the commands it started with ``keep_on_disconnect: false``. Its sandboxes live on until
killed or expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

from forkd import __version__
from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import Transport, TransportClosed

from ._params import bad, is_stream_id, opt_int, opt_number, opt_str, req_str, str_list, str_map
from ._relay import DOWN_KINDS, MAX_RELAY_WINDOW, DownRelay, UpRelay, agent_call

if TYPE_CHECKING:
    from ._gateway import Gateway
    from ._sandbox import Sandbox

__all__ = ["Session", "SessionState", "RELAYED_PREFIXES"]

log = logging.getLogger("forkd.gateway.session")

# Agent method groups a client may call in a sandbox (docs/protocol.md); hello/info/identity stay private.
RELAYED_PREFIXES = ("exec.", "files.", "context.", "code.")
# Methods whose envs the sandbox's default envs are merged under.
_WITH_ENVS = frozenset({"exec.start", "context.create", "code.run"})
_ids = itertools.count(1)


class SessionState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSED = "closed"


class _WatchedTransport:
    """Notes when the client last sent anything (the heartbeat pings only idle clients)."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self.send = inner.send
        self.close = inner.close
        self.last_recv = time.monotonic()

    async def recv(self) -> bytes:
        body = await self._inner.recv()
        self.last_recv = time.monotonic()
        return body


class Session:
    def __init__(self, gateway: Gateway, transport: Transport, key_id: str) -> None:
        self.gateway = gateway
        self.key_id = key_id
        self.id = next(_ids)
        self.state = SessionState.AWAIT_HELLO
        self.client = ""
        self.transport = _WatchedTransport(transport)
        self.conn = Connection(self.transport, self._handle, self._on_notification, name=f"session-{self.id}")
        # client stream id -> DownRelay | UpRelay
        self.streams: dict[int, Any] = {}
        self.watches: set[tuple[Sandbox, int]] = set()
        # Commands started with keep_on_disconnect: false die with this session.
        self.doomed: set[tuple[Sandbox, int]] = set()

    # -- running --
    async def run(self) -> None:
        self.conn.start()
        beat = None
        if self.gateway.config.heartbeat > 0:
            beat = asyncio.get_running_loop().create_task(self._heartbeat(self.gateway.config.heartbeat))
        try:
            await self.conn.wait_closed()
        finally:
            if beat is not None:
                beat.cancel()
            self.state = SessionState.CLOSED
            await self._cleanup()

    async def close(self, reason: str = "closed") -> None:
        await self.conn.close(reason)

    async def _heartbeat(self, interval: float) -> None:
        while not self.conn.closed.is_set():
            idle = time.monotonic() - self.transport.last_recv
            if idle < interval:
                await asyncio.sleep(interval - idle)
                continue
            try:
                await self.conn.request("ping", {}, timeout=interval)
            except TransportClosed:
                return
            except p.RpcError as exc:
                if exc.code is p.ErrorCode.TIMEOUT:
                    log.info(
                        "session %d (%s): no answer to ping in %.0f s, closing",
                        self.id,
                        self.key_id,
                        interval,
                    )
                    await self.conn.close("heartbeat timeout")
                    return
                # Any other answer (unknown_method from a client without handlers) proves it is alive.

    async def _cleanup(self) -> None:
        calls = []
        for relay in list(self.streams.values()):
            await relay.abandon()
        for sandbox, wid in self.watches:
            if sandbox.watches.get(wid) is self:
                del sandbox.watches[wid]
            calls.append(agent_call(sandbox, "files.unwatch", {"watch": wid}))
        for sandbox, pid in self.doomed:
            calls.append(agent_call(sandbox, "exec.kill", {"pid": pid}))
        self.watches.clear()
        self.doomed.clear()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)

    # -- dispatch --
    async def _handle(self, conn: Connection, method: str, params: dict) -> Any:
        try:
            if method == "ping":
                return {"pong": True, "time": time.time()}
            if method == "hello":
                return self._hello(params)
            if self.state is not SessionState.OPEN:
                raise p.RpcError(p.ErrorCode.PROTOCOL, f"{method}: send hello first")
            lifecycle = _LIFECYCLE.get(method)
            if lifecycle is not None:
                return await lifecycle(self, params)
            if method.startswith(RELAYED_PREFIXES):
                return await self._relay(method, params)
            raise p.RpcError(p.ErrorCode.UNKNOWN_METHOD, f"unknown method {method!r}")
        except p.RpcError as exc:
            self.gateway.metrics.errors.labels(exc.code.value).inc()
            raise

    async def _on_notification(self, conn: Connection, method: str, params: dict) -> None:
        if method == "error":
            log.debug("session %d: client reports %r", self.id, params.get("error"))

    def _hello(self, params: dict) -> dict:
        version = params.get("version")
        if type(version) is not int or version != p.PROTOCOL_VERSION:
            raise p.RpcError(
                p.ErrorCode.PROTOCOL,
                f"protocol version {version!r} is not supported; this gateway speaks version {p.PROTOCOL_VERSION}",
            )
        client = params.get("client")
        self.client = client if isinstance(client, str) else ""
        self.state = SessionState.OPEN
        return {
            "version": p.PROTOCOL_VERSION,
            "gateway": f"forkd-gateway/{__version__}",
            "key_id": self.key_id,
        }

    # -- lifecycle --
    async def _create(self, params: dict) -> dict:
        internet = params.get("allow_internet_access")
        if internet is not None and not isinstance(internet, bool):
            raise bad("'allow_internet_access' must be a boolean")
        sandbox = await self.gateway.create(
            self.key_id,
            template=opt_str(params, "template"),
            timeout=opt_number(params, "timeout"),
            metadata=str_map(params, "metadata"),
            envs=str_map(params, "envs"),
            internet=internet,
        )
        return sandbox.info()

    async def _connect(self, params: dict) -> dict:
        sandbox = self.gateway.connect(
            self.key_id, req_str(params, "sandbox_id"), opt_number(params, "timeout")
        )
        return sandbox.info()

    async def _kill(self, params: dict) -> bool:
        return await self.gateway.kill(self.key_id, req_str(params, "sandbox_id"))

    async def _set_timeout(self, params: dict) -> dict:
        timeout = opt_number(params, "timeout")
        if timeout is None:
            raise bad("'timeout' is required")
        self.gateway.set_timeout(self.key_id, req_str(params, "sandbox_id"), timeout)
        return {}

    async def _info(self, params: dict) -> dict:
        return self.gateway.info(self.key_id, req_str(params, "sandbox_id")).info()

    async def _list(self, params: dict) -> dict:
        items, token = self.gateway.list(
            self.key_id,
            metadata=str_map(params, "metadata"),
            states=str_list(params, "state", ["running"]),
            limit=opt_int(params, "limit", 100),
            next_token=opt_str(params, "next_token"),
        )
        return {"items": [s.info() for s in items], "next_token": token}

    async def _branch(self, params: dict) -> dict:
        return await self.gateway.branch(
            self.key_id, params.get("sandbox_id"), params.get("count"), opt_number(params, "timeout")
        )

    async def _snapshot_create(self, params: dict) -> dict:
        record = await self.gateway.create_snapshot(
            self.key_id, req_str(params, "sandbox_id"), opt_str(params, "name")
        )
        return record.info()

    async def _snapshot_list(self, params: dict) -> dict:
        items, token = self.gateway.snapshots.list(
            self.key_id,
            sandbox_id=opt_str(params, "sandbox_id"),
            name=opt_str(params, "name"),
            limit=opt_int(params, "limit", 100),
            next_token=opt_str(params, "next_token"),
        )
        return {"items": [r.info() for r in items], "next_token": token}

    async def _snapshot_delete(self, params: dict) -> bool:
        return await self.gateway.delete_snapshot(self.key_id, req_str(params, "snapshot_id"))

    async def _eval(self, params: dict) -> Any:
        forwarded = {"expr": params.get("expr"), "sandbox_id": params.get("sandbox_id")}
        if "context" in params:
            forwarded["context"] = params["context"]
        return await self._relay("code.eval", forwarded)

    # -- relaying --
    async def _relay(self, method: str, params: dict) -> Any:
        sandbox = self.gateway.sandbox_for_call(self.key_id, params.get("sandbox_id"))
        params = dict(params)
        del params["sandbox_id"]
        if method in _WITH_ENVS and sandbox.envs:
            envs = params.get("envs")
            if envs is None or isinstance(envs, dict):
                params["envs"] = {**sandbox.envs, **(envs or {})}
        if method in DOWN_KINDS and (method != "exec.start" or params.get("stream") is not None):
            return await self._relay_down(sandbox, method, params)
        handler = _STREAM_CONTROL.get(method)
        if handler is not None:
            return await handler(self, sandbox, method, params)
        result = await self._call(sandbox, method, params)
        if method == "exec.start":
            self._started(sandbox, params, result)
        return result

    async def _call(self, sandbox: Sandbox, method: str, params: dict) -> Any:
        try:
            return await sandbox.conn.request(method, params)
        except TransportClosed:
            raise sandbox.ended_error() from None

    def _started(self, sandbox: Sandbox, params: dict, result: Any) -> None:
        self.gateway.metrics.execs.inc()
        if params.get("keep_on_disconnect") is False and isinstance(result, dict):
            pid = result.get("pid")
            if type(pid) is int:
                self.doomed.add((sandbox, pid))

    def _client_stream(self, params: dict) -> int:
        sid = params.get("stream")
        if not is_stream_id(sid):
            raise bad("'stream' must be an integer >= 0")
        return sid

    def _new_stream(self, params: dict) -> tuple[int, int]:
        sid = self._client_stream(params)
        if sid in self.streams:
            raise bad(f"stream {sid} is already in use")
        if len(self.streams) >= self.gateway.config.max_streams_per_session:
            raise p.RpcError(
                p.ErrorCode.RATE_LIMIT, f"too many open streams on this connection ({len(self.streams)})"
            )
        window = params.get("window", p.DEFAULT_WINDOW)
        if type(window) is not int or window < 1:
            raise bad("'window' must be an integer >= 1")
        return sid, window

    async def _relay_down(self, sandbox: Sandbox, method: str, params: dict) -> Any:
        sid, window = self._new_stream(params)
        relay = DownRelay(self, sandbox, sid, DOWN_KINDS[method], window)
        params["stream"] = relay.agent_id
        params["window"] = min(window, MAX_RELAY_WINDOW)
        relay.start()
        try:
            try:
                result = await self._call(sandbox, method, params)
            except asyncio.CancelledError:
                await relay.abandon()
                raise
            except BaseException:
                # code.run's timeout (say) ends its stream before answering: forward that first.
                if relay.ended:
                    await relay.wait()
                else:
                    await relay.stop()
                raise
            if method == "exec.start":
                self._started(sandbox, params, result)
            elif method == "code.run" and relay.ended:
                await relay.wait()  # the agent ends code.run's stream before answering: keep that order
            return result
        finally:
            relay.answer()

    async def _stop_down(self, sandbox: Sandbox, method: str, params: dict) -> Any:
        sid = self._client_stream(params)
        relay = self.streams.get(sid)
        if not isinstance(relay, DownRelay) or relay.sandbox is not sandbox:
            return {}  # unknown or finished stream: a no-op, as on the agent
        await relay.stop()
        return await self._call(sandbox, method, {**params, "stream": relay.agent_id})

    async def _write_open(self, sandbox: Sandbox, method: str, params: dict) -> Any:
        sid, window = self._new_stream(params)
        relay = UpRelay(self, sandbox, sid, sandbox.conn.new_stream_id())
        params["stream"] = relay.agent_id
        params["window"] = min(window, MAX_RELAY_WINDOW)
        try:
            result = await self._call(sandbox, method, params)
        except asyncio.CancelledError:
            await relay.abandon()
            raise
        except BaseException:
            relay.forget()
            raise
        granted = result.get("window") if isinstance(result, dict) else None
        relay.open(granted if type(granted) is int and granted > 0 else params["window"])
        return result

    def _write_relay(self, sandbox: Sandbox, params: dict) -> UpRelay | None:
        relay = self.streams.get(self._client_stream(params))
        return relay if isinstance(relay, UpRelay) and relay.sandbox is sandbox else None

    async def _write_close(self, sandbox: Sandbox, method: str, params: dict) -> Any:
        relay = self._write_relay(sandbox, params)
        if relay is None:
            raise bad(f"no write is open on stream {params['stream']}")
        try:
            await relay.finish()
        finally:
            relay.forget()
        return await self._call(sandbox, method, {**params, "stream": relay.agent_id})

    async def _write_abort(self, sandbox: Sandbox, method: str, params: dict) -> Any:
        relay = self._write_relay(sandbox, params)
        if relay is None:
            return {}
        await relay.abort()
        relay.forget()
        return await self._call(sandbox, method, {**params, "stream": relay.agent_id})

    async def _watch(self, sandbox: Sandbox, method: str, params: dict) -> Any:
        result = await self._call(sandbox, method, params)
        wid = result.get("watch") if isinstance(result, dict) else None
        if type(wid) is int:
            if self.state is SessionState.CLOSED:  # the client left while the watch was being made
                await agent_call(sandbox, "files.unwatch", {"watch": wid})
            else:
                sandbox.watches[wid] = self
                self.watches.add((sandbox, wid))
        return result

    async def _unwatch(self, sandbox: Sandbox, method: str, params: dict) -> Any:
        wid = params.get("watch")
        if type(wid) is not int:
            raise bad("'watch' must be an integer")
        if (sandbox, wid) not in self.watches:
            raise p.RpcError(p.ErrorCode.NOT_FOUND, f"no watch {wid} on this connection")
        result = await self._call(sandbox, method, params)
        self.watches.discard((sandbox, wid))
        if sandbox.watches.get(wid) is self:
            del sandbox.watches[wid]
        return result

    async def notify(self, method: str, params: dict) -> None:
        with contextlib.suppress(TransportClosed):
            await self.conn.notify(method, params)


_LIFECYCLE = {
    "sandbox.create": Session._create,
    "sandbox.connect": Session._connect,
    "sandbox.kill": Session._kill,
    "sandbox.set_timeout": Session._set_timeout,
    "sandbox.info": Session._info,
    "sandbox.list": Session._list,
    "sandbox.eval": Session._eval,
    "sandbox.branch": Session._branch,
    "snapshot.create": Session._snapshot_create,
    "snapshot.list": Session._snapshot_list,
    "snapshot.delete": Session._snapshot_delete,
}

_STREAM_CONTROL = {
    "exec.detach": Session._stop_down,
    "files.read_abort": Session._stop_down,
    "files.write_open": Session._write_open,
    "files.write_close": Session._write_close,
    "files.write_abort": Session._write_abort,
    "files.watch": Session._watch,
    "files.unwatch": Session._unwatch,
}
