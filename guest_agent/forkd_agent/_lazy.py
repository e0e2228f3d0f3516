"""Answer the cheapest requests before the full agent exists.

A freshly forked sandbox that has not been used yet should cost almost
nothing: starting an event loop and the agent's components in every child
dirties hundreds of copy-on-write pages (~2.5 MiB) and milliseconds of CPU.
So a child first serves ``hello`` and ``ping`` from this blocking loop, and
starts the real agent on the first other frame, handing it every byte not yet
answered. Nothing is lost or reordered: frames are handled strictly in order,
and the hand-over happens before the first frame this loop does not answer.
"""

from __future__ import annotations

import os

from forkd import protocol as p

from ._server import hello_result, ping_result

_LEN = 4


def answer_until_needed(fd: int, sandbox_id: str) -> bytes | None:
    """Serve hello/ping on ``fd``; return the unanswered bytes (starting with the
    first frame needing the full agent), or None when the peer closed."""
    raw = bytearray()
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            return None
        raw += data
        while len(raw) >= _LEN:
            size = int.from_bytes(raw[:_LEN], "big")
            if size > p.MAX_FRAME_SIZE or len(raw) < _LEN + size:
                if size > p.MAX_FRAME_SIZE:
                    return bytes(raw)  # the agent refuses it properly
                break
            try:
                msg = p.decode(bytes(raw[_LEN : _LEN + size]))
            except p.ProtocolError:
                return bytes(raw)
            if not (isinstance(msg, p.Request) and msg.method in ("hello", "ping")):
                return bytes(raw)
            try:
                result = hello_result(msg.params, sandbox_id) if msg.method == "hello" else ping_result()
                reply = p.Response(msg.id, None, result)
            except p.RpcError as exc:
                reply = p.Response(msg.id, exc, None)
            out = p.frame(p.encode(reply))
            while out:
                out = out[os.write(fd, out) :]
            del raw[: _LEN + size]
