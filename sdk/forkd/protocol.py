"""The forkd wire protocol: the only module that knows how frames look.

SDK, gateway and guest agent all speak it. It is sans-IO: it turns messages into
bytes and bytes into messages, and never touches a socket. It depends on msgpack
alone, because the guest agent imports it inside minimal sandbox images.

A frame body is one msgpack array whose first element says what it is:

    [0, id, method, params]              Request   (id: int >= 0, params: map)
    [1, id, error, result]               Response  (error: None or [code, message])
    [2, method, params]                  Notification
    [3, stream, fd, offset, data]        StreamData (data: bin; offset: byte offset in that fd)

On a websocket every message is one frame body. On a byte stream (unix socket,
socketpair, virtio-serial port) each body is preceded by its length as a 4-byte
big-endian unsigned integer, so an oversized frame can be refused before it is
buffered. See docs/protocol.md for every method.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

import msgpack

__all__ = [
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "MAX_FRAME_SIZE",
    "CHUNK_SIZE",
    "DEFAULT_WINDOW",
    "FD_STDOUT",
    "FD_STDERR",
    "FD_PTY",
    "RESULT_FORMATS",
    "ErrorCode",
    "RpcError",
    "ProtocolError",
    "FrameTooLarge",
    "Request",
    "Response",
    "Notification",
    "StreamData",
    "Message",
    "encode",
    "decode",
    "frame",
    "FrameReader",
]

PROTOCOL_VERSION = 1
SUBPROTOCOL = "forkd.v1"
# Bigger than any chunk we send (CHUNK_SIZE) plus envelope, small enough that a
# hostile peer cannot make us buffer much.
MAX_FRAME_SIZE = 4 * 1024 * 1024
CHUNK_SIZE = 1024 * 1024
# Bytes a stream sender may have in flight before the receiver acknowledges them.
DEFAULT_WINDOW = 4 * 1024 * 1024

FD_STDOUT = 1
FD_STDERR = 2
FD_PTY = 3

# The formats a code-interpreter result may carry (`code.run` results, after
# IPython's display conventions); binary ones (png, jpeg, pdf) as base64 text.
RESULT_FORMATS = (
    "text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript", "data", "chart",
)  # fmt: skip

_REQUEST, _RESPONSE, _NOTIFICATION, _STREAM = 0, 1, 2, 3
_LEN = struct.Struct(">I")


class ErrorCode(enum.StrEnum):
    """Error codes on the wire. Each maps to exactly one SDK exception class."""

    SANDBOX = "sandbox_error"  # generic / internal
    TIMEOUT = "timeout"
    SANDBOX_NOT_RUNNING = "sandbox_not_running"
    SANDBOX_UNREACHABLE = "sandbox_unreachable"
    INVALID_ARGUMENT = "invalid_argument"
    NOT_ENOUGH_SPACE = "not_enough_space"
    NOT_FOUND = "not_found"
    FILE_NOT_FOUND = "file_not_found"
    SANDBOX_NOT_FOUND = "sandbox_not_found"
    TEMPLATE = "template_error"
    RATE_LIMIT = "rate_limit"
    AUTHENTICATION = "authentication"
    SERVICE_BUSY = "service_busy"
    PROTOCOL = "protocol_error"
    UNKNOWN_METHOD = "unknown_method"
    CANCELLED = "cancelled"
    CONFLICT = "conflict"  # the target's state forbids the call now (busy; in use by others)


class RpcError(Exception):
    """An error that travels on the wire as ``[code, message]``."""

    def __init__(self, code: ErrorCode | str, message: str = "") -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            code = ErrorCode.SANDBOX
        super().__init__(message or code.value)
        self.code: ErrorCode = code
        self.message = message or code.value

    def to_wire(self) -> list[str]:
        return [self.code.value, self.message]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class ProtocolError(RpcError):
    """A frame that is not valid forkd protocol.

    ``request_id`` is set when the frame was recognisably a request, so the
    receiver can answer that request with the error instead of dropping it.
    """

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(ErrorCode.PROTOCOL, message)
        self.request_id = request_id


class FrameTooLarge(ProtocolError):
    pass


class Request(NamedTuple):
    id: int
    method: str
    params: dict


class Response(NamedTuple):
    id: int
    error: RpcError | None
    result: Any


class Notification(NamedTuple):
    method: str
    params: dict


class StreamData(NamedTuple):
    stream: int
    fd: int
    offset: int
    data: bytes


Message = Request | Response | Notification | StreamData


def encode(msg: Message) -> bytes:
    """Encode one message as a frame body (what a websocket message carries)."""
    match msg:
        case StreamData(stream, fd, offset, data):
            return msgpack.packb([_STREAM, stream, fd, offset, data], use_bin_type=True)
        case Request(id, method, params):
            return msgpack.packb([_REQUEST, id, method, params], use_bin_type=True)
        case Response(id, error, result):
            err = error.to_wire() if error is not None else None
            return msgpack.packb([_RESPONSE, id, err, result], use_bin_type=True)
        case Notification(method, params):
            return msgpack.packb([_NOTIFICATION, method, params], use_bin_type=True)
    raise TypeError(f"not a protocol message: {msg!r}")


def frame(body: bytes) -> bytes:
    """Length-prefix a frame body for a byte-stream transport."""
    return _LEN.pack(len(body)) + body


def _is_int(v: Any) -> bool:
    return type(v) is int and v >= 0


def decode(body: bytes | bytearray | memoryview, max_size: int = MAX_FRAME_SIZE) -> Message:
    """Decode one frame body. Raises ProtocolError (only) on anything invalid."""
    if len(body) > max_size:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the limit of {max_size}")
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed frame: {type(exc).__name__}") from None
    if not isinstance(obj, list) or not obj or type(obj[0]) is not int:
        raise ProtocolError("frame is not a tagged array")
    kind, n = obj[0], len(obj)
    if kind == _STREAM and n == 5:
        _, stream, fd, offset, data = obj
        if _is_int(stream) and _is_int(fd) and _is_int(offset) and isinstance(data, bytes):
            return StreamData(stream, fd, offset, data)
        raise ProtocolError("bad stream frame")
    if kind == _REQUEST and n == 4:
        _, rid, method, params = obj
        if not _is_int(rid):
            raise ProtocolError("bad request id")
        if not isinstance(method, str) or not isinstance(params, dict):
            raise ProtocolError("request needs a method name and a params map", request_id=rid)
        return Request(rid, method, params)
    if kind == _RESPONSE and n == 4:
        _, rid, err, result = obj
        if not _is_int(rid):
            raise ProtocolError("bad response id")
        if err is None:
            return Response(rid, None, result)
        if isinstance(err, list) and len(err) >= 2 and isinstance(err[0], str) and isinstance(err[1], str):
            return Response(rid, RpcError(err[0], err[1]), None)
        raise ProtocolError("bad error in response")
    if kind == _NOTIFICATION and n == 3:
        _, method, params = obj
        if isinstance(method, str) and isinstance(params, dict):
            return Notification(method, params)
        raise ProtocolError("bad notification")
    raise ProtocolError(f"unknown frame kind {kind} with {n} fields")


class FrameReader:
    """Splits a byte stream into frame bodies (sans-IO).

    ``feed()`` bytes as they arrive, then iterate ``frames()``. An oversized frame
    raises FrameTooLarge once; its bytes are then skipped so the connection can
    carry on with the next frame.
    """

    def __init__(self, max_size: int = MAX_FRAME_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0

    def feed(self, data: bytes) -> None:
        # Drop the oversized body as it arrives, but only the part of it that is
        # not already buffered (frames() raised before it could skip that part).
        beyond = self._skip - (len(self._buf) - self._pos)
        if beyond > 0:
            n = min(beyond, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data

    def frames(self):
        buf = self._buf
        while True:
            if self._skip:  # an oversized frame whose body arrived with the header
                n = min(self._skip, len(buf) - self._pos)
                self._skip -= n
                self._pos += n
                if self._skip:
                    break
            avail = len(buf) - self._pos
            if avail < 4:
                break
            (size,) = _LEN.unpack_from(buf, self._pos)
            if size > self.max_size:
                self._pos += 4
                self._skip = size
                self._compact()
                raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_size}")
            if avail < 4 + size:
                break
            start = self._pos + 4
            self._pos = start + size
            yield bytes(buf[start : self._pos])
        self._compact()

    def _compact(self) -> None:
        # Drop consumed bytes; cheap because it happens once per feed, not per frame.
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos
