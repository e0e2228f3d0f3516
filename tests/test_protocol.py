"""The wire codec (forkd.protocol): round trips, fuzzing, and frame splitting."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from forkd import protocol as p

settings.register_profile(
    "forkd-protocol",
    deadline=None,  # other test suites share the machine
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
FAST = settings.get_profile("forkd-protocol")

MESSAGE_TYPES = (p.Request, p.Response, p.Notification, p.StreamData)

u64 = st.integers(min_value=0, max_value=2**64 - 1)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), inner, max_size=5)
    ),
    max_leaves=25,
)
params = st.dictionaries(st.text(max_size=10), values, max_size=6)
methods = st.text(max_size=30)
errors = st.builds(p.RpcError, st.sampled_from(list(p.ErrorCode)), st.text(min_size=1, max_size=40))

requests = st.builds(p.Request, u64, methods, params)
responses = st.builds(p.Response, u64, st.none(), values) | st.builds(p.Response, u64, errors, st.none())
notifications = st.builds(p.Notification, methods, params)
stream_frames = st.builds(p.StreamData, u64, u64, u64, st.binary(max_size=300))
messages = requests | responses | notifications | stream_frames


def same(a: p.Message, b: p.Message) -> bool:
    """Equality that also compares the errors inside responses (exceptions compare by identity)."""
    if type(a) is not type(b):
        return False
    if type(a) is p.Response and (a.error is not None or b.error is not None):
        if a.error is None or b.error is None:
            return False
        return (a.id, a.error.code, a.error.message, a.result) == (
            b.id,
            b.error.code,
            b.error.message,
            b.result,
        )
    return a == b


def check_decoded(body: bytes) -> None:
    """decode() either refuses with ProtocolError or returns a message that survives a round trip."""
    try:
        msg = p.decode(body)
    except p.ProtocolError:
        return
    assert isinstance(msg, MESSAGE_TYPES)
    again = p.decode(p.encode(msg))
    # NaN results make == useless; comparing the encodings is exact.
    assert p.encode(again) == p.encode(msg)


# -- round trip -------------------------------------------------------------


@FAST
@given(messages)
def test_encode_decode_round_trip(msg):
    body = p.encode(msg)
    assert same(p.decode(body), msg)
    assert p.encode(p.decode(body)) == body


@settings(FAST, max_examples=40)
@given(st.lists(messages, max_size=6), st.data())
def test_framed_messages_survive_any_split(msgs, data):
    wire = b"".join(p.frame(p.encode(m)) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    reader = p.FrameReader()
    out = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[prev:cut])
        prev = cut
        out.extend(p.decode(b) for b in reader.frames())
    assert len(out) == len(msgs)
    assert all(same(a, b) for a, b in zip(out, msgs, strict=True))
    assert reader.buffered == 0


def test_error_codes_and_messages():
    # An unknown code from a newer peer degrades to the generic error, keeping the message.
    body = msgpack.packb([1, 5, ["brand_new_code", "details"], None])
    msg = p.decode(body)
    assert msg.error.code == p.ErrorCode.SANDBOX and msg.error.message == "details"
    # An empty message is filled with the code, so users never see a blank error.
    assert p.RpcError(p.ErrorCode.NOT_FOUND).message == "not_found"
    # A request with a bad params map is answerable: the error knows its id.
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(msgpack.packb([0, 9, "ping", []]))
    assert ei.value.request_id == 9 and ei.value.code == p.ErrorCode.PROTOCOL


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        p.encode(("not", "a", "message"))


def test_decode_refuses_oversized_body():
    with pytest.raises(p.FrameTooLarge):
        p.decode(p.encode(p.StreamData(1, 1, 0, b"x" * 100)), max_size=50)


# -- fuzzing decode ---------------------------------------------------------


@FAST
@given(st.binary(max_size=200))
@example(b"")
@example(b"\xc1")  # never-used msgpack byte
@example(b"\x94\x00\x01\xa1m\x80\x00")  # a valid request followed by extra data
@example(b"\x93\x02\xa1m\x81\x91\x01\x01")  # a map whose key is a list (unhashable)
@example(b"\x95\x03\xcf\xff\xff\xff\xff\xff\xff\xff\xff\x01\x00\xc4\x00")
@example(b"\x94\x01\x01\x93\xa1x\xa1y\xa1z\xc0")  # error with extra fields
@example(b"\x94\x01\x01\x92\x01\x02\xc0")  # error that is not two strings
@example(b"\x94\xc3\x01\xa1m\x80")  # kind is a bool, not an int
@example(b"\xdd\xff\xff\xff\xff")  # array header claiming 4 billion elements
def test_decode_random_bytes(body):
    check_decoded(body)


def _mutations(msg, data):
    body = bytearray(p.encode(msg))
    how = data.draw(st.sampled_from(["truncate", "flip", "both", "splice"]))
    if how in ("truncate", "both"):
        body = body[: data.draw(st.integers(0, max(len(body) - 1, 0)))]
    if how in ("flip", "both") and body:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] ^= 1 << data.draw(st.integers(0, 7))
    if how == "splice":
        i = data.draw(st.integers(0, len(body)))
        body[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(body)


@FAST
@given(messages, st.data())
def test_decode_damaged_frames(msg, data):
    check_decoded(_mutations(msg, data))


@settings(FAST, max_examples=60)
@given(st.lists(values, min_size=1, max_size=5))
def test_decode_well_formed_msgpack_of_any_shape(items):
    # Valid msgpack that is not (quite) a protocol frame: wrong tags, field counts and types.
    check_decoded(msgpack.packb(items, use_bin_type=True))
    check_decoded(msgpack.packb([0, *items], use_bin_type=True))
    check_decoded(msgpack.packb([1, *items], use_bin_type=True))
    check_decoded(msgpack.packb([3, *items], use_bin_type=True))


# -- FrameReader ------------------------------------------------------------


def _feed_all(reader: p.FrameReader, chunks: list[bytes]) -> tuple[list[bytes], int]:
    """Feed chunks one by one, draining after each; returns (bodies, FrameTooLarge count)."""
    bodies, too_large = [], 0
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            try:
                bodies.extend(reader.frames())
                break
            except p.FrameTooLarge:
                too_large += 1
    return bodies, too_large


def _split(data, wire: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@FAST
@given(st.lists(st.binary(max_size=64), max_size=10), st.data())
def test_frame_reader_yields_exact_bodies(bodies, data):
    wire = b"".join(p.frame(b) for b in bodies)
    got, too_large = _feed_all(p.FrameReader(), _split(data, wire))
    assert got == bodies and too_large == 0


@FAST
@given(st.lists(st.binary(max_size=80), max_size=10), st.data())
def test_frame_reader_skips_each_oversized_frame_once(bodies, data):
    limit = 40
    wire = b"".join(p.frame(b) for b in bodies)
    got, too_large = _feed_all(p.FrameReader(max_size=limit), _split(data, wire))
    assert got == [b for b in bodies if len(b) <= limit]
    assert too_large == sum(len(b) > limit for b in bodies)


def test_oversized_body_in_pieces_then_next_frame():
    reader = p.FrameReader(max_size=10)
    big = b"B" * 25
    wire = p.frame(big) + p.frame(b"next") + p.frame(b"after")
    # Header plus a little of the big body, then the rest in pieces, the next
    # frames glued to the last piece.
    reader.feed(wire[:7])
    with pytest.raises(p.FrameTooLarge):
        list(reader.frames())
    reader.feed(wire[7:15])
    reader.feed(wire[15:25])
    assert list(reader.frames()) == []
    reader.feed(wire[25:])
    assert list(reader.frames()) == [b"next", b"after"]
    assert reader.buffered == 0


def test_feeding_again_right_after_the_error():
    # The caller feeds more before asking for frames again: the part of the big
    # body that was already buffered must still be skipped first.
    reader = p.FrameReader(max_size=10)
    wire = p.frame(b"B" * 20) + p.frame(b"ok")
    reader.feed(wire[:9])
    with pytest.raises(p.FrameTooLarge):
        list(reader.frames())
    reader.feed(wire[9:])
    assert list(reader.frames()) == [b"ok"]


@FAST
@given(st.binary(max_size=300), st.data(), st.sampled_from([8, 64, p.MAX_FRAME_SIZE]))
@example(b"\x00\x00\x00\x05hello\xff\xff\xff\xff", None, 8)
def test_frame_reader_fuzz(wire, data, limit):
    chunks = _split(data, wire) if data is not None else [wire]
    reader = p.FrameReader(max_size=limit)
    bodies, _ = _feed_all(reader, chunks)
    # Whatever came out is a body within the limit, and everything is accounted for.
    assert all(len(b) <= limit for b in bodies)
    assert sum(4 + len(b) for b in bodies) + reader.buffered <= len(wire)
    for body in bodies:
        check_decoded(body)
