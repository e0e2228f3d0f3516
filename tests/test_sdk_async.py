"""AsyncSandbox against the real gateway (process backend) over the in-memory transport.

What the compatibility tests do not reach: streaming volume and backpressure,
UTF-8 split across chunks, many calls multiplexed on one connection, clean-up
after abandoned streams, failures mid-stream, client-side deadlines, heartbeats.
One gateway serves the whole module.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio

from forkd import (
    AsyncSandbox,
    CommandExitException,
    EvalException,
    FileNotFoundException,
    SandboxNotRunningException,
    TimeoutException,
)
from forkd._client import get_client
from forkd._transports import memory_pair

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Gw:
    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.sessions = 0

    def opts(self, key_id: str = "alice", **extra) -> dict:
        async def factory():
            ours, theirs = memory_pair()
            self.sessions += 1
            asyncio.get_running_loop().create_task(self.gateway.serve(theirs, key_id))
            return ours

        # One factory object per key id: calls with the same key share a connection.
        cache = self.__dict__.setdefault("_factories", {})
        return {"transport_factory": cache.setdefault(key_id, factory), **extra}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(template_store, tmp_path_factory):
    from forkd_gateway._config import GatewayConfig, PoolConfig
    from forkd_gateway._gateway import Gateway

    state = tmp_path_factory.mktemp("sdk-async")
    config = GatewayConfig(
        backend="process",
        state_dir=state,
        templates_dir=Path(template_store.root).parent,
        pools={"base": PoolConfig(min_ready=2, max_total=32)},
        audit_log=state / "audit.log",
        heartbeat=0.2,
    )
    gateway = Gateway(config)
    await gateway.start()
    yield Gw(gateway)
    await gateway.close()


@pytest_asyncio.fixture(loop_scope="module")
async def sbx(gw):
    s = await AsyncSandbox.create(**gw.opts())
    yield s
    await s.kill()


async def test_many_calls_share_one_connection(gw):
    before = gw.sessions
    sandboxes = await asyncio.gather(*(AsyncSandbox.create(**gw.opts("carol")) for _ in range(4)))
    results = await asyncio.gather(
        *(s.commands.run(f"echo {i}") for i, s in enumerate(sandboxes) for _ in range(5))
    )
    assert sorted(r.stdout for r in results) == sorted(f"{i}\n" for i in range(4) for _ in range(5))
    assert gw.sessions == before + 1
    await asyncio.gather(*(s.kill() for s in sandboxes))


async def test_large_output_streams_through_the_window(sbx):
    received = 0

    async def count(text):
        nonlocal received
        received += len(text)

    # 24 MiB: six times the credit window, so the stream must be acknowledged as it goes.
    r = await sbx.commands.run(
        "head -c 25165824 /dev/zero | tr '\\0' x", on_stdout=count, retain_output=False
    )
    assert received == 25165824 and r.stdout is None and r.exit_code == 0


async def test_slow_consumer_still_gets_everything_in_order(sbx):
    seen = []

    async def slow(text):
        await asyncio.sleep(0.001)
        seen.append(text)

    r = await sbx.commands.run("seq 1 20000", on_stdout=slow)
    assert "".join(seen) == r.stdout == "".join(f"{i}\n" for i in range(1, 20001))


async def test_utf8_split_across_chunks(sbx):
    r = await sbx.commands.run("printf '\\xc3'; sleep 0.2; printf '\\xa9\\n'; printf '\\xe2\\x82' >&2")
    assert r.stdout == "é\n"
    assert r.stderr == "\ufffd"  # an incomplete sequence at the end becomes U+FFFD


async def test_sandbox_envs_reach_commands_and_code(gw):
    s = await AsyncSandbox.create(envs={"LEVEL": "debug"}, **gw.opts())
    try:
        assert (await s.commands.run("echo $LEVEL")).stdout == "debug\n"
        assert (await s.run_code("import os; os.environ['LEVEL']")).text == "'debug'"
    finally:
        await s.kill()


async def test_connect_timeout_is_client_side(sbx):
    h = await sbx.commands.run("sleep 5; echo done", background=True, timeout=0)
    follower = await sbx.commands.connect(h.pid, timeout=0.3)
    with pytest.raises(TimeoutException):
        await follower.wait()
    assert h.pid in [p.pid for p in await sbx.commands.list()]  # the command itself still runs
    assert await h.kill()


async def test_disconnect_stops_callbacks(sbx):
    got = []
    h = await sbx.commands.run("for i in $(seq 50); do echo $i; sleep 0.02; done", background=True,
                               on_stdout=got.append)  # fmt: skip
    while not got:
        await asyncio.sleep(0.01)
    await h.disconnect()
    n = len(got)
    await asyncio.sleep(0.2)
    assert len(got) == n
    assert await sbx.commands.kill(h.pid)


async def test_abandoned_read_and_failed_write(sbx):
    await sbx.files.write("big.bin", b"z" * (9 * 1024 * 1024))
    stream = await sbx.files.read("big.bin", format="stream")
    first = await stream.__anext__()
    assert first[:1] == b"z"
    await stream.aclose()
    assert [c async for c in stream] == []

    def broken():
        yield b"part one"
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        await sbx.files.write("never.txt", broken())
    assert not await sbx.files.exists("never.txt")  # atomic: nothing half-written
    assert (await sbx.files.read("big.bin", format="bytes"))[-1:] == bytearray(b"z")  # the connection is fine


async def test_killed_sandbox_during_streams(gw):
    s = await AsyncSandbox.create(**gw.opts())
    await s.files.write("f.bin", b"y" * (12 * 1024 * 1024))
    reader = await s.files.read("f.bin", format="stream")
    run = asyncio.ensure_future(s.run_code("import time; time.sleep(30)"))
    await asyncio.sleep(0.2)
    await s.kill()
    with pytest.raises(SandboxNotRunningException):
        async for _ in reader:
            await asyncio.sleep(0.01)
    with pytest.raises(SandboxNotRunningException):
        await asyncio.wait_for(run, 10)
    with pytest.raises(SandboxNotRunningException):
        await s.files.read("f.bin")


async def test_code_results_in_order(sbx):
    order = []
    code = "for i in range(3):\n    print(i)\n    display(i * 10)\n'end'"
    ex = await sbx.run_code(
        code, on_stdout=lambda m: order.append(m.line), on_result=lambda r: order.append(r.text)
    )
    assert [r.text for r in ex.results] == ["0", "10", "20", "'end'"]
    assert order[-1] == "'end'" and sorted(order) == sorted(["0\n", "1\n", "2\n", "0", "10", "20", "'end'"])


async def test_eval(sbx):
    assert await sbx.eval("2 ** 10") == 1024
    assert await sbx.eval("b'raw'") == b"raw"
    assert await sbx.eval("(1, 2)") == [1, 2]
    with pytest.raises(EvalException) as info:
        await sbx.eval("1/0")
    assert info.value.name == "ZeroDivisionError"
    ctx = await sbx.create_code_context()
    await sbx.run_code("v = 'in ctx'", context=ctx)
    assert await sbx.eval("v", context=ctx) == "in ctx"


async def test_errors_keep_the_connection(sbx):
    client = await get_client(sbx.connection_config)
    with pytest.raises(FileNotFoundException):
        await sbx.files.read("/no/such/file")
    with pytest.raises(CommandExitException):
        await sbx.commands.run("false")
    assert await get_client(sbx.connection_config) is client and not client.closed


async def test_gateway_heartbeats_keep_an_idle_client(sbx):
    client = await get_client(sbx.connection_config)
    await asyncio.sleep(0.8)  # the gateway pings idle clients every 0.2 s here; the SDK answers
    assert not client.closed
    assert (await sbx.commands.run("echo alive")).stdout == "alive\n"
    assert await get_client(sbx.connection_config) is client


async def test_a_cancelled_foreground_run_kills_its_command(sbx):
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sbx.commands.run("sleep 30"), 0.3)

    async def sleeping():
        return [p for p in await sbx.commands.list() if p.args[-1] == "sleep 30"]

    for _ in range(100):
        if not await sleeping():
            break
        await asyncio.sleep(0.02)
    assert not await sleeping()


async def test_code_interpreter_classes_default_to_their_template(gw):
    # `from forkd.code_interpreter import Sandbox` replaces `from e2b_code_interpreter import Sandbox`:
    # its default template is the code-interpreter one (built or not, depending on the run).
    from forkd import TemplateException
    from forkd import code_interpreter as ci

    try:
        s = await ci.AsyncSandbox.create(**gw.opts())
    except TemplateException as exc:
        assert "'code-interpreter'" in str(exc)
    else:
        try:
            assert (await s.get_info()).template_id == "code-interpreter"
        finally:
            await s.kill()
    # An explicit template still wins.
    s = await ci.AsyncSandbox.create("base", **gw.opts())
    try:
        assert isinstance(s, AsyncSandbox) and (await s.run_code("1 + 1")).text == "2"
    finally:
        await s.kill()
