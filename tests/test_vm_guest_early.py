"""The VM guest's native early loop (vm/_guest_early.c) against the Python loop
it stands in for, on the host: a socketpair plays the virtio-serial port.

What a user of a child relies on: the answers are the ones Python would give,
in order, nothing lost, anything unusual left to Python, and the agent's
`random` state is the one the refresh report announces.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import threading
import time

import pytest

from forkd import protocol as p
from forkd_agent._identity import _derive
from forkd_agent._lazy import answer_until_needed

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="reseeding the kernel RNG needs root")


class Loop:
    """The guest's early loop on one end of a socketpair, in a thread; records
    which requests reached Python."""

    def __init__(self, guest, library) -> None:
        from forkd_agent._features import load_features
        from forkd_agent._methods import METHODS

        load_features()
        self.host, port = socket.socketpair()
        self.host.settimeout(10)
        self.early = guest._Early("parent-id", {})
        self.in_python: list[str] = []
        answer = guest.early_answer(self.early, METHODS)

        def recorded(msg):
            self.in_python.append(msg.method)
            return answer(msg)

        self.left: list = []
        serve = guest.native_early(port.fileno(), self.early, str(library))
        assert serve is not None
        self.thread = threading.Thread(
            target=lambda: self.left.append(
                answer_until_needed(port.fileno(), recorded, wait_on_eof=True, native=serve)
            ),
            daemon=True,
        )
        self._port = port
        self._buf = b""
        self.thread.start()

    def send(self, *requests: p.Request) -> bytes:
        data = b"".join(p.frame(p.encode(r)) for r in requests)
        self.host.sendall(data)
        return data

    def response(self) -> p.Response:
        while len(self._buf) < 4 or len(self._buf) < 4 + int.from_bytes(self._buf[:4], "big"):
            self._buf += self.host.recv(65536)
        size = int.from_bytes(self._buf[:4], "big")
        msg, self._buf = p.decode(self._buf[4 : 4 + size]), self._buf[4 + size :]
        return msg

    def handed_over(self) -> bytes:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the loop never handed over"
        return self.left[0]

    def close(self) -> None:
        if self.thread.is_alive():  # let it end as in a guest: handing over
            self.send(p.Request(99, "exec.start", {}))
            self.thread.join(10)
        self.host.close()
        self._port.close()


@pytest.fixture
def loop(guest, early_library):
    lp = Loop(guest, early_library)
    yield lp
    lp.close()


def _fingerprint(material: bytes) -> str:
    r = random.Random()
    r.seed(_derive(b"random", material))
    return r.getrandbits(64).to_bytes(8, "big").hex()


@needs_root
def test_refresh_answered_natively_matches_python_and_seeds_random(loop):
    entropy = os.urandom(48)
    # The clock inside the tolerance: checked, not set (this is the host's clock).
    loop.send(
        p.Request(1, "ping", {}),
        p.Request(
            2,
            "identity.refresh",
            {"time": time.time(), "clock_tolerance": 3600, "entropy": entropy, "sandbox_id": "child-7"},
        ),
    )
    assert loop.response().result["pong"] is True
    rep = loop.response()
    assert rep.id == 2 and rep.error is None
    skew = rep.result["clock"].pop("skew_s")
    assert abs(skew) < 5
    assert rep.result == {
        "clock": {"ok": True, "action": "in_sync"},
        "kernel_rng": {"ok": True, "action": "reseeded"},
        "random": {"ok": True, "numpy": "numpy" in sys.modules},
        "random_fingerprint": _fingerprint(entropy),
        "hostname": {"ok": True, "action": "skipped"},
        "sandbox_id": "child-7",
        "kernels_reseeded": 0,
    }
    tail = loop.send(p.Request(3, "exec.start", {"cmd": "true"}))
    assert loop.handed_over() == tail
    assert loop.in_python == ["exec.start"]  # neither the ping nor the refresh needed Python
    # What the report announced is what the agent's `random` now produces.
    assert random.getrandbits(64).to_bytes(8, "big").hex() == rep.result["random_fingerprint"]
    assert loop.early.sandbox_id == "child-7"


def test_refresh_without_entropy_draws_fresh_material(loop):
    loop.send(p.Request(1, "identity.refresh", {"sandbox_id": "a"}), p.Request(2, "identity.refresh", {}))
    first, second = loop.response().result, loop.response().result
    assert first["kernel_rng"] == {"ok": True, "action": "skipped"}
    assert first["random_fingerprint"] != second["random_fingerprint"]
    assert second["sandbox_id"] == "a"
    loop.send(p.Request(3, "exec.start", {}))
    loop.handed_over()
    assert loop.in_python == ["exec.start"]
    assert random.getrandbits(64).to_bytes(8, "big").hex() == second["random_fingerprint"]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"entropy": b"short"}, "'entropy' must be 32 to 4096 bytes"),
        ({"hostname": "two words"}, "whitespace"),
        ({"hostname": "x" * 65}, "hostname must be 1 to 64 bytes"),
        ({"time": float("nan")}, "'time' must be a positive, finite number"),
        ({"time": True}, "'time' must be int or float"),
        ({"sandbox_id": ""}, "sandbox_id must be 1 to 256"),
        ({"entropy": "not bytes" * 8}, "'entropy' must be bytes"),
    ],
)
def test_what_python_would_refuse_is_refused_by_python(loop, params, message):
    loop.send(p.Request(1, "identity.refresh", params), p.Request(2, "ping", {}))
    rep = loop.response()
    assert rep.error is not None and rep.error.code == p.ErrorCode.INVALID_ARGUMENT
    assert message in rep.error.message
    assert loop.response().result["pong"] is True
    assert loop.in_python == ["identity.refresh"]  # and the ping after it natively again
    assert loop.early.sandbox_id == "parent-id"  # nothing changed


def test_pipelined_frames_keep_their_order_and_nothing_is_lost(loop):
    big = p.Request(9, "files.write", {"path": "/x", "data": os.urandom(200_000)})  # > the native buffer
    loop.send(
        p.Request(1, "ping", {}), p.Request(2, "info", {}), p.Request(3, "ping", {"extra": [1, {"a": b"b"}]})
    )
    tail = loop.send(big, p.Request(10, "ping", {}))
    assert [loop.response().id for _ in range(3)] == [1, 2, 3]
    assert loop.handed_over() == tail
    assert loop.in_python == ["info", "files.write"]


@pytest.mark.parametrize(
    "frame",
    [
        p.frame(b"\x94\x00\x01\xa4ping\x90"),  # params not a map
        p.frame(p.encode(p.Request(2, "ping", {})) + b"\xc0"),  # trailing bytes
        p.frame(p.encode(p.Notification("ping", {}))),
    ],
    ids=["params-not-a-map", "trailing-bytes", "notification"],
)
def test_frames_that_are_not_plain_requests_go_to_python(loop, frame):
    tail = frame + p.frame(p.encode(p.Request(7, "ping", {})))
    loop.host.sendall(tail)
    assert loop.handed_over() == tail


def test_a_value_the_native_reader_does_not_know_is_left_to_python(loop):
    loop.host.sendall(p.frame(b"\x94\x00\x01\xa4ping\x81\xa1a\xd4\x01\x02"))  # an ext type in the params
    assert loop.response().result["pong"] is True
    assert loop.in_python == ["ping"]
