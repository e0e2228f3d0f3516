"""Talk to a real forkd guest agent through the wire protocol.

Starts ``python -m forkd_agent`` on a private unix socket (warmed with numpy),
then streams a command's output, runs stateful Python with a rich result,
round-trips a file, and prints how long each step took.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import StreamTransport


async def main() -> None:
    tmp = tempfile.mkdtemp(prefix="forkd-demo-")
    sock = os.path.join(tmp, "agent.sock")
    t0 = time.perf_counter()
    agent = subprocess.Popen(
        [sys.executable, "-m", "forkd_agent", "--listen", f"unix:{sock}", "--warmup", "import numpy"]
    )
    try:
        while not os.path.exists(sock):
            await asyncio.sleep(0.005)
        conn = Connection(await StreamTransport.connect_unix(sock), name="demo").start()
        await conn.request("hello", {"version": p.PROTOCOL_VERSION})
        print(f"agent up and warm in {1000 * (time.perf_counter() - t0):.0f} ms")

        t = time.perf_counter()
        stream = conn.open_inbound()
        started = await conn.request(
            "exec.start",
            {"cmd": "for i in 1 2 3; do echo line $i; sleep 0.1; done; echo oops >&2", "stream": stream.id},
        )
        async for fd, offset, data in stream:
            name = "stdout" if fd == p.FD_STDOUT else "stderr"
            print(
                f"  [{1000 * (time.perf_counter() - t):5.0f} ms] pid {started['pid']} {name}@{offset}: {data!r}"
            )
        end = stream.end_info
        print(f"exit_code={end['exit_code']} reason={end['reason']}")

        out = conn.open_inbound()
        t = time.perf_counter()
        await conn.request("code.run", {"code": "import numpy as np\nx = np.arange(10)", "stream": out.id})
        async for _ in out:
            pass
        out = conn.open_inbound()
        res = await conn.request("code.run", {"code": "print('sum is', x.sum())\nx.mean()", "stream": out.id})
        printed = b"".join([d async for _, _, d in out])
        print(
            f"run_code: printed {printed!r}, result {res['results'][0]['text']} ({1000 * (time.perf_counter() - t):.1f} ms)"
        )

        t = time.perf_counter()
        n = 200
        for _ in range(n):
            await conn.request("code.eval", {"expr": "1+1"})
        print(f"eval('1+1'): {1e6 * (time.perf_counter() - t) / n:.0f} µs per call over {n} calls")

        data = os.urandom(8 * 1024 * 1024)
        t = time.perf_counter()
        up = conn.new_stream_id()
        opened = await conn.request("files.write_open", {"path": f"{tmp}/blob.bin", "stream": up})
        conn.open_outbound(up, opened.get("window", p.DEFAULT_WINDOW))
        for off in range(0, len(data), p.CHUNK_SIZE):
            await conn.send_stream(up, 0, off, data[off : off + p.CHUNK_SIZE])
        await conn.request("files.write_close", {"stream": up})
        down = conn.open_inbound()
        await conn.request("files.read", {"path": f"{tmp}/blob.bin", "stream": down.id})
        back = b"".join([d async for _, _, d in down])
        dt = time.perf_counter() - t
        print(f"8 MiB file round trip intact={back == data} in {1000 * dt:.0f} ms")
        await conn.close()
    finally:
        agent.terminate()
        agent.wait(5)


if __name__ == "__main__":
    asyncio.run(main())
