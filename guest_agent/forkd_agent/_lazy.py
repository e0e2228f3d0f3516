"""Answer the cheapest requests before the full agent exists.

A freshly forked or restored sandbox that has not been used yet should cost
almost nothing: starting an event loop and the agent's components in every
child dirties hundreds of copy-on-write pages (~2.5 MiB) and milliseconds of
CPU (tens under TCG). So a child first serves a few requests from this
blocking loop, and starts the real agent on the first other frame, handing it
every byte not yet answered. Nothing is lost or reordered: frames are handled
strictly in order, and the hand-over happens before the first frame this loop
does not answer.

Process-backend children answer ``hello`` and ``ping`` here (see
``core_answer``); the VM guest adds ``info`` and ``identity.refresh``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from forkd import protocol as p

from ._server import hello_result, ping_result

_LEN = 4


class HandOver(Exception):
    """Raised by an answer function: this frame needs the full agent."""


def core_answer(sandbox_id: str) -> Callable[[p.Request], Any]:
    def answer(msg: p.Request) -> Any:
        if msg.method == "hello":
            return hello_result(msg.params, sandbox_id)
        if msg.method == "ping":
            return ping_result()
        raise HandOver

    return answer


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue


def answer_until_needed(
    fd: int,
    answer: Callable[[p.Request], Any],
    *,
    wait_on_eof: bool = False,
    initial: bytes = b"",
    native: Callable[[bytes], bytes | None] | None = None,
) -> bytes | None:
    """Serve requests on the blocking ``fd`` with ``answer(request) -> result``
    (raising RpcError for an error reply, HandOver for the full agent); return
    the unanswered bytes, from the first frame needing the full agent on.
    ``initial``: bytes already read from ``fd`` (by the native ping loop).

    ``native(pending)``: a loop in C that takes the bytes not yet answered,
    reads ``fd`` itself, answers what it can and returns the bytes from the
    first frame it leaves to this loop on (None once it cannot serve any more:
    plain reads from then on). This loop then answers that one frame and gives
    the rest back.

    End of stream returns None, or with ``wait_on_eof`` (a virtio-serial port,
    whose reads return at once while the host end is not connected) waits."""
    raw = bytearray(initial)
    to_native = native is not None
    while True:
        if to_native:  # only ever set while there is a native loop
            more = native(bytes(raw))
            if more is None:
                native = None
            else:
                raw = bytearray(more)
            to_native = False
        while len(raw) >= _LEN:
            size = int.from_bytes(raw[:_LEN], "big")
            if size > p.MAX_FRAME_SIZE:
                return bytes(raw)  # the agent refuses it properly
            if len(raw) < _LEN + size:
                break
            try:
                msg = p.decode(bytes(raw[_LEN : _LEN + size]))
            except p.ProtocolError:
                return bytes(raw)
            if not isinstance(msg, p.Request):
                return bytes(raw)
            try:
                reply = p.Response(msg.id, None, answer(msg))
            except HandOver:
                return bytes(raw)
            except p.RpcError as exc:
                reply = p.Response(msg.id, exc, None)
            write_all(fd, p.frame(p.encode(reply)))
            del raw[: _LEN + size]
            if native is not None:
                to_native = True  # one frame answered here: the rest is the native loop's again
                break
        if to_native:
            continue
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            if not wait_on_eof:
                return None
            time.sleep(0.05)  # not spinning while nobody is connected
            continue
        raw += data
