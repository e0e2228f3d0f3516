"""The BRANCH RAM sink (``forkd_runtime.vm._migration_sink``) on hand-made
QEMU 7.2 migration streams: pages land at their offsets in the RAM file, a
page sent again as zero is cleared, other blocks' records and every device
section stay in the state file, and what it does not understand fails."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys

import pytest

from forkd_runtime.vm import _migration_sink as ms

SIZE = 64 * 4096
CONFIG = bytes([ms.CONFIG]) + struct.pack(">I", 7) + b"microvm"
CAPS = bytes([ms.SUBSECTION, 26]) + b"configuration/capabilities" + struct.pack(">I", 1)
CAPS += struct.pack(">I", 1) + bytes([15]) + b"x-ignore-shared"
DEVICES = bytes([ms.FULL]) + struct.pack(">IB", 3, 6) + b"device" + struct.pack(">II", 0, 1) + b"\x7e\x00"


def record(offset: int, flags: int, block: bytes | None = None, data: bytes = b"") -> bytes:
    out = struct.pack(">Q", offset | flags | (0 if block else ms.F_CONTINUE))
    if block:
        out += bytes([len(block)]) + block
    return out + data


def section(kind: int, sid: int, records: list[bytes]) -> bytes:
    body = b"".join(records) + struct.pack(">Q", ms.F_EOS)
    return bytes([kind]) + struct.pack(">I", sid) + body + bytes([ms.FOOTER]) + struct.pack(">I", sid)


def stream(parts: list[bytes]) -> bytes:
    setup = (
        struct.pack(">Q", (SIZE + 4096) | ms.F_MEM_SIZE) + bytes([3]) + b"mem" + struct.pack(">QQ", SIZE, 0)
    )
    setup += bytes([3]) + b"rom" + struct.pack(">QQ", 4096, 1 << 30)
    start = bytes([ms.START]) + struct.pack(">IB", 1, 3) + b"ram" + struct.pack(">II", 0, 4)
    start += setup + struct.pack(">Q", ms.F_EOS) + bytes([ms.FOOTER]) + struct.pack(">I", 1)
    head = struct.pack(">II", ms.MAGIC, ms.VERSION) + CONFIG + CAPS
    return head + start + b"".join(parts) + DEVICES + bytes([ms.EOF]) + b"\x06vmdesc"


def sink(tmp_path, data: bytes) -> tuple[bytes, bytes, dict]:
    mem, state = tmp_path / "ram", tmp_path / "state"
    src = tmp_path / "stream"
    src.write_bytes(data)
    with open(src, "rb") as f:
        out = subprocess.run(
            [sys.executable, "-I", "-S", ms.__file__, "--memory", str(mem), "--size", str(SIZE),
             "--state", str(state), "--fd", "0"],
            stdin=f, capture_output=True, check=False,
        )  # fmt: skip
    report = json.loads(out.stdout.decode().splitlines()[-1])
    if out.returncode:
        return b"", b"", report
    return mem.read_bytes(), state.read_bytes(), report


def test_pages_go_to_the_ram_file_and_the_rest_to_the_state(tmp_path):
    a, b = b"A" * 4096, b"B" * 4096
    parts = [
        section(ms.PART, 1, [record(0, ms.F_PAGE, b"mem", a), record(4096, ms.F_PAGE, None, b),
                             record(0, ms.F_PAGE, b"rom", b"R" * 4096), record(8192, ms.F_PAGE, b"mem", a)]),
        # The last pass: page 1 became zero, page 0 changed again.
        section(ms.END, 1, [record(4096, ms.F_ZERO, b"mem", b"\0"), record(0, ms.F_PAGE, None, b)]),
    ]  # fmt: skip
    ram, state, report = sink(tmp_path, stream(parts))
    assert len(ram) == SIZE and os.stat(tmp_path / "ram").st_blocks * 512 >= SIZE  # allocated whole
    assert ram[:4096] == b and ram[4096:8192] == bytes(4096) and ram[8192:12288] == a
    assert ram[12288:] == bytes(SIZE - 12288)
    assert report["pages"] == 4 and report["rewritten"] == 1 and report["other_pages"] == 1
    # The state keeps the header, configuration, RAM framing, the ROM page, the devices.
    assert state.startswith(struct.pack(">II", ms.MAGIC, ms.VERSION) + CONFIG + CAPS)
    assert b"R" * 4096 in state and a not in state and b not in state
    assert state.endswith(DEVICES + bytes([ms.EOF]) + b"\x06vmdesc")
    reparsed = ms.Sink(ms._Reader(os.open(tmp_path / "state", os.O_RDONLY)), io.BytesIO(), "mem", -1, SIZE)
    assert reparsed.run()["pages"] == 0


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not a migration stream at all", "not a QEMU migration stream"),
        (stream([section(ms.PART, 1, [record(0, 0x100, b"mem", b"x")])]), "not supported"),
        (stream([section(ms.PART, 1, [record(SIZE, ms.F_PAGE, b"mem", b"x" * 4096)])]), "beyond"),
        (stream([section(ms.PART, 1, [record(0, ms.F_PAGE, b"mem", b"short")])]), "ended"),
    ],
)
def test_what_it_does_not_understand_fails(tmp_path, data, error):
    _, _, report = sink(tmp_path, data)
    assert error in report["error"]
