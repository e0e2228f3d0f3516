"""The ``exec.*`` methods: start, attach to and steer processes.

No handler here awaits before its work is done: requests are handled in arrival
order, and a subscription's first frame goes out after the response.
"""

from __future__ import annotations

import signal

from forkd import protocol as p
from forkd._connection import Connection
from forkd.protocol import ErrorCode, RpcError

from . import _params as params_
from . import _pty
from ._methods import method
from ._process_spec import parse_spec
from ._process_table import Processes


def _stream_params(params: dict) -> tuple[int, int]:
    stream = params_.get_int(params, "stream", minimum=0)
    window = params_.get_int(params, "window", p.DEFAULT_WINDOW, minimum=1)
    return stream, window


def _pid(params: dict) -> int:
    return params_.get_int(params, "pid", minimum=1)


def _signal_number(value: object) -> int:
    if type(value) is int:
        try:
            return int(signal.Signals(value))
        except ValueError:
            pass
        if signal.SIGRTMIN <= value <= signal.SIGRTMAX:
            return value
    elif isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise RpcError(
        ErrorCode.INVALID_ARGUMENT, f"unknown signal {value!r} (use a number or a name like 'SIGTERM')"
    )


@method("exec.start")
async def _exec_start(agent, conn: Connection, params: dict) -> dict:
    table: Processes = agent.processes
    spec = parse_spec(agent, params)
    keep = params_.get(params, "keep_on_disconnect", bool, True)
    stream = window = None
    if params.get("stream") is not None:
        stream, window = _stream_params(params)
        table.check_stream_free(conn, stream)
    proc = table.spawn(spec)
    if not keep:
        proc.owner = conn
        if conn.closed.is_set():
            proc.kill_group(signal.SIGKILL)
    if stream is not None:
        table.subscribe(proc, conn, stream, window, {fd: 0 for fd in proc.outputs})
    return {"pid": proc.pid, "started_at": proc.started_at}


@method("exec.prepare")
async def _exec_prepare(agent, conn: Connection, params: dict) -> dict:
    # A hint: start the shell that the next command with these params will run in.
    spec = parse_spec(agent, {**params, "cmd": ""})
    return {"prepared": agent.processes.shell.park_now(spec)}


def _requested_offsets(params: dict) -> dict[int, int]:
    raw = params_.get(params, "offsets", dict, {})
    out: dict[int, int] = {}
    for k, v in raw.items():
        try:
            fd = int(k)
        except (TypeError, ValueError):
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"offsets key {k!r} is not an fd number") from None
        if type(v) is not int or v < 0:
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"offset for fd {fd} must be an integer >= 0")
        out[fd] = v
    return out


@method("exec.attach")
async def _exec_attach(agent, conn: Connection, params: dict) -> dict:
    table: Processes = agent.processes
    pid = _pid(params)
    stream, window = _stream_params(params)
    requested = _requested_offsets(params)
    proc = table.lookup(pid)
    table.check_stream_free(conn, stream)
    offsets: dict[int, int] = {}
    truncated = False
    for fd, out in proc.outputs.items():
        want = requested.get(fd)
        if want is None:
            offsets[fd] = out.ring.start
        elif want > out.ring.end:
            raise RpcError(
                ErrorCode.INVALID_ARGUMENT,
                f"offset {want} for fd {fd} is past the end of the output ({out.ring.end} bytes so far)",
            )
        elif want < out.ring.start:
            offsets[fd] = out.ring.start
            truncated = True
        else:
            offsets[fd] = want
    table.subscribe(proc, conn, stream, window, offsets)
    return {"pid": pid, "offsets": {str(fd): off for fd, off in offsets.items()}, "truncated": truncated}


@method("exec.detach")
async def _exec_detach(agent, conn: Connection, params: dict) -> dict:
    agent.processes.detach(conn, params_.get_int(params, "stream", minimum=0))
    return {}


@method("exec.stdin")
async def _exec_stdin(agent, conn: Connection, params: dict) -> dict:
    proc = agent.processes.lookup(_pid(params))
    data = params_.get(params, "data", (bytes, str))
    if isinstance(data, str):
        data = data.encode()
    await proc.write_stdin(data)  # queued in request order before this first await
    return {}


@method("exec.close_stdin")
async def _exec_close_stdin(agent, conn: Connection, params: dict) -> dict:
    proc = agent.processes.lookup(_pid(params))
    await proc.close_stdin()
    return {}


@method("exec.signal")
async def _exec_signal(agent, conn: Connection, params: dict) -> dict:
    pid = _pid(params)
    sig = _signal_number(params.get("signal"))
    proc = agent.processes.lookup(pid)
    return {"delivered": proc.kill_group(sig)}


@method("exec.kill")
async def _exec_kill(agent, conn: Connection, params: dict) -> dict:
    proc = agent.processes.procs.get(_pid(params))
    return {"killed": proc is not None and proc.kill_group(signal.SIGKILL)}


@method("exec.resize")
async def _exec_resize(agent, conn: Connection, params: dict) -> dict:
    pid = _pid(params)
    rows, cols = _pty.check_size(params.get("rows"), params.get("cols"))
    proc = agent.processes.lookup(pid)
    if not proc.is_pty:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, f"process {pid} has no terminal (start it with pty)")
    proc.resize(rows, cols)
    return {}


@method("exec.list")
async def _exec_list(agent, conn: Connection, params: dict) -> list:
    return [proc.info() for proc in agent.processes.running()]
