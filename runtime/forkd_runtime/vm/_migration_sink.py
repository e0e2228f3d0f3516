"""Splits a QEMU 7.2 migration stream into a RAM file and a device state.

BRANCH live-migrates the source VM into a pipe read by this program, run as
its own process (``python3 -I -S _migration_sink.py ...``: standard library
only, and no GIL shared with the runtime's event loop, which drives the pause
meanwhile). Every page of the guest-RAM block goes into the new memory file,
at its offset; everything else (header, configuration, the RAM section
framing with the pages of other blocks (ROMs), every device section) is
copied to the state file, which children load exactly as a parent's.

Stream layout (migration/savevm.c, migration/ram.c of QEMU 7.2):
``magic version [0x07 configuration] section* 0x00 [0x06 vmdesc]``; a
section is ``type id [idstr instance version] payload 0x7e id``; RAM
payloads are records ``be64 offset|flags [idstr] data`` up to EOS. Only
what a plain precopy migration writes is understood (no compression,
XBZRLE, multifd or postcopy); anything else fails loudly.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time

MAGIC = 0x5145564D
VERSION = 3
EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND, FOOTER = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7E,
)  # fmt: skip
# RAM record flags (low bits of the be64 offset).
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
F_UNSUPPORTED = 0x01 | 0x40 | 0x80 | 0x100 | 0x200
PAGE = 4096
PAGE_MASK = ~(PAGE - 1)


class StreamError(Exception):
    pass


class _Reader:
    """Exact reads from a pipe (a short read is the end of the stream)."""

    def __init__(self, fd: int) -> None:
        self.f = os.fdopen(fd, "rb", buffering=1 << 20)
        self.total = 0

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise StreamError(f"stream ended after {self.total + len(b)} bytes (wanted {n} more)")
        self.total += n
        return b

    def read_into(self, view: memoryview) -> None:
        n = self.f.readinto(view)
        if n != len(view):
            raise StreamError(f"stream ended inside a page at byte {self.total + (n or 0)}")
        self.total += n

    def u8(self) -> int:
        return self.read(1)[0]

    def be32(self) -> int:
        return struct.unpack(">I", self.read(4))[0]

    def be64(self) -> int:
        return struct.unpack(">Q", self.read(8))[0]


class _Pages:
    """Writes pages into the RAM file, consecutive ones in one ``pwrite``."""

    BATCH = 256 * 1024

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buf = bytearray(self.BATCH)
        self.view = memoryview(self.buf)
        self.start = 0  # file offset of buf[0]
        self.used = 0

    def slot(self, offset: int) -> memoryview:
        """Where the page at ``offset`` goes (read it in there)."""
        if self.used and (offset != self.start + self.used or self.used == self.BATCH):
            self.flush()
        if not self.used:
            self.start = offset
        at = self.used
        self.used += PAGE
        return self.view[at : at + PAGE]

    def flush(self) -> None:
        done = 0
        while done < self.used:
            done += os.pwrite(self.fd, self.view[done : self.used], self.start + done)
        self.used = 0


class Sink:
    def __init__(self, src: _Reader, out, block: str, fd: int, size: int) -> None:
        self.src = src
        self.out = out  # what the children load: everything but the block's pages
        self.block = block.encode()
        self.pages = _Pages(fd, size)
        self.size = size
        # Pages written so far: a page sent again as zero must be cleared.
        self.written = bytearray(size // PAGE)
        self.ignore_shared = False
        self.sections: dict[int, bytes] = {}
        self.current: bytes | None = None  # the block of the last RAM record
        self.stats = {"pages": 0, "zero_pages": 0, "rewritten": 0, "other_pages": 0, "ram_bytes": 0}

    # -- framing ---------------------------------------------------------------------

    def run(self) -> dict:
        r, w = self.src, self.out.write
        head = r.read(8)
        magic, version = struct.unpack(">II", head)
        if magic != MAGIC or version != VERSION:
            raise StreamError(f"not a QEMU migration stream (magic {magic:#x}, version {version})")
        w(head)
        while True:
            kind = r.u8()
            if kind == CONFIG:
                w(bytes([kind]) + self._configuration())
            elif kind == START:
                sid = r.be32()
                n = r.u8()
                idstr = r.read(n)
                if idstr != b"ram":
                    raise StreamError(f"iterative section {idstr!r} is not supported")
                self.sections[sid] = idstr
                w(bytes([kind]) + struct.pack(">IB", sid, n) + idstr + r.read(8))  # + instance, version
                self._ram_section(sid)
            elif kind in (PART, END):
                sid = r.be32()
                if sid not in self.sections:
                    raise StreamError(f"section {sid} continues but never started")
                w(bytes([kind]) + struct.pack(">I", sid))
                self._ram_section(sid)
                if kind == END:
                    break
            elif kind == COMMAND:
                raise StreamError("migration commands (postcopy) are not supported")
            else:
                # A device section before RAM is complete: not what a precopy writes.
                raise StreamError(f"unexpected section type {kind:#x} at byte {r.total - 1}")
        # After RAM: every device's section (not self-delimiting, copied as
        # they come), EOF and the VM description.
        while True:
            chunk = self.src.f.read(1 << 16)
            if not chunk:
                break
            self.src.total += len(chunk)
            w(chunk)
        self.stats["stream_bytes"] = self.src.total
        return self.stats

    def _ram_section(self, sid: int) -> None:
        self._ram()
        foot = self.src.read(5)
        if foot[0] != FOOTER or struct.unpack(">I", foot[1:])[0] != sid:
            raise StreamError(f"section {sid}: bad footer {foot.hex()} at byte {self.src.total - 5}")
        self.out.write(foot)

    def _configuration(self) -> bytes:
        r = self.src
        n = r.be32()
        parts = [struct.pack(">I", n), r.read(n)]
        while self.src.f.peek(1)[:1] == bytes([SUBSECTION]):
            r.read(1)
            ln = r.u8()
            name = r.read(ln)
            ver = r.read(4)
            parts.append(bytes([SUBSECTION, ln]) + name + ver)
            if name == b"configuration/capabilities":
                count = r.be32()
                caps = []
                body = [struct.pack(">I", count)]
                for _ in range(count):
                    cl = r.u8()
                    cap = r.read(cl)
                    caps.append(cap)
                    body.append(bytes([cl]) + cap)
                self.ignore_shared = b"x-ignore-shared" in caps
                parts += body
            elif name == b"configuration/target-page-bits":
                bits = r.read(4)
                if struct.unpack(">I", bits)[0] != 12:
                    raise StreamError("only 4 KiB target pages are supported")
                parts.append(bits)
            elif name == b"configuration/uuid":
                parts.append(r.read(16))
            else:
                raise StreamError(f"unknown configuration subsection {name!r}")
        return b"".join(parts)

    # -- RAM ---------------------------------------------------------------------------

    def _ram(self) -> None:
        r, w = self.src, self.out.write
        pages, written, stats = self.pages, self.written, self.stats
        ours = self.block
        zero_page = bytes(PAGE)
        unpack = struct.Struct(">Q").unpack
        read, read_into = r.read, r.read_into
        kept = []
        while True:
            raw = read(8)
            (word,) = unpack(raw)
            flags = word & (PAGE - 1)
            offset = word & PAGE_MASK
            if flags & F_EOS:
                kept.append(raw)
                break
            if flags & F_MEM_SIZE:
                kept.append(raw + self._block_list(offset))
                continue
            if flags & F_UNSUPPORTED:
                raise StreamError(f"RAM record flags {flags:#x} (compression, XBZRLE...) are not supported")
            if flags & F_CONTINUE:
                name = self.current
                ident = b""
            else:
                n = read(1)
                name = read(n[0])
                ident = n + name
                self.current = name
            if name == ours:
                if offset + PAGE > self.size:
                    raise StreamError(f"page at {offset:#x} beyond the {self.size} bytes of {ours!r}")
                pg = offset // PAGE
                if flags & F_PAGE:
                    read_into(pages.slot(offset))
                    written[pg] = 1
                    stats["pages"] += 1
                elif flags & F_ZERO:
                    if read(1) != b"\0":
                        raise StreamError("a zero-page record with a non-zero fill byte")
                    if written[pg]:
                        pages.slot(offset)[:] = zero_page
                        written[pg] = 0
                        stats["rewritten"] += 1
                    stats["zero_pages"] += 1
                else:
                    raise StreamError(f"RAM record flags {flags:#x} carry no page")
                continue
            # Another block (ROMs, firmware tables): left in the device state.
            if flags & F_PAGE:
                data = read(PAGE)
            elif flags & F_ZERO:
                data = read(1)
            else:
                raise StreamError(f"RAM record flags {flags:#x} carry no page")
            stats["other_pages"] += 1
            kept.append(raw + ident + data)
            if len(kept) > 256:
                w(b"".join(kept))
                kept.clear()
        w(b"".join(kept))
        pages.flush()
        stats["ram_bytes"] = stats["pages"] * PAGE

    def _block_list(self, total: int) -> bytes:
        r, parts = self.src, []
        seen = 0
        while seen < total:
            n = r.read(1)
            name = r.read(n[0])
            length = r.read(8)
            parts.append(n + name + length)
            size = struct.unpack(">Q", length)[0]
            if name == self.block and size != self.size:
                raise StreamError(f"block {name!r} is {size} bytes, the memory file {self.size}")
            if self.ignore_shared:
                parts.append(r.read(8))  # the block's guest address
            seen += size
        return b"".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forkd-migration-sink")
    ap.add_argument("--memory", required=True, help="the new RAM file (created, sized and allocated here)")
    ap.add_argument("--size", type=int, required=True, help="bytes of the guest RAM block")
    ap.add_argument("--block", default="mem", help="the RAM block's id in the stream")
    ap.add_argument("--state", required=True, help="where the device state goes")
    ap.add_argument("--fd", type=int, default=0, help="the stream (default stdin)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    fd = os.open(args.memory, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, args.size)
        # Allocated whole (see _parent._fill_holes), before the pages arrive:
        # writing them is then a copy, not an allocation per page.
        os.posix_fallocate(fd, 0, args.size)
        print(json.dumps({"ready": True}), flush=True)
        t1 = time.monotonic()
        with open(args.state, "wb") as out:
            stats = Sink(_Reader(args.fd), out, args.block, fd, args.size).run()
    finally:
        os.close(fd)
    stats["alloc_s"] = round(t1 - t0, 4)
    stats["stream_s"] = round(time.monotonic() - t1, 4)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StreamError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        sys.exit(2)
