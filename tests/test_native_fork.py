"""The zygote's native fork path (forkd_agent/_forkcore.c) and its Python fallback."""

import asyncio
import dataclasses
import re
import shutil

import pytest

from forkd_runtime._backend import SpawnError


def zygote_of(backend, template: str = "base"):
    return backend._zygotes[template]


async def test_native_path_in_use_where_a_compiler_exists(process_backend):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: zygotes fork from Python here")
    snap = await process_backend.prepare("base")
    assert zygote_of(process_backend).info["native"] is True
    kids = await process_backend.spawn(snap, 4)
    infos = [await k.conn.request("info") for k in kids]
    assert [i["pid"] for i in infos] == [1, 1, 1, 1]
    assert sorted(i["hostname"] for i in infos) == sorted(k.id for k in kids)


async def test_frames_arriving_together_are_answered_in_order(process_backend):
    """Pings answered by the C loop, the rest handed to the agent with the bytes
    already read: nothing lost, nothing reordered."""
    snap = await process_backend.prepare("base")
    (kid,) = await process_backend.spawn(snap, 1)
    calls = [kid.conn.request("ping") for _ in range(20)]
    calls += [kid.conn.request("info"), kid.conn.request("ping"), kid.conn.request("hello", {"version": 1})]
    results = await asyncio.gather(*calls)
    assert all(r["pong"] is True for r in results[:20])
    assert results[20]["hostname"] == kid.id
    assert results[21]["pong"] is True
    assert results[22]["sandbox_id"] == kid.id
    # The full agent runs now: a command sees the sandbox's own hostname.
    out = kid.conn.open_inbound()
    await kid.conn.request("exec.start", {"cmd": "cat /proc/sys/kernel/hostname", "stream": out.id})
    data = b"".join([chunk async for _fd, _off, chunk in out])
    assert data == kid.id.encode() + b"\n"


async def test_a_failed_setup_is_reported_and_costs_only_that_child(process_backend):
    snap = await process_backend.prepare("base")
    broken = dataclasses.replace(snap, meta={**snap.meta, "state": "no-such-state"})
    with pytest.raises(SpawnError) as failed:
        await process_backend.spawn(broken, 1)
    cid = re.search(r"sbx-[0-9a-f]+", str(failed.value)).group()
    log = (process_backend.state / "logs" / "zygote-base.log").read_text()
    assert f"forkd child {cid}: setup failed" in log
    (kid,) = await process_backend.spawn(snap, 1)  # the zygote carries on
    assert (await kid.conn.request("ping"))["pong"] is True


async def test_python_fallback_when_disabled(template_store, tmp_path, monkeypatch):
    from forkd_runtime._process_backend import ProcessBackend

    monkeypatch.setenv("FORKD_NATIVE_FORK", "0")
    backend = ProcessBackend(store=template_store, root=tmp_path / "state")
    await backend.start()
    try:
        snap = await backend.prepare("base")
        assert zygote_of(backend).info["native"] is False
        kids = await backend.spawn(snap, 3)
        infos = [await k.conn.request("info") for k in kids]
        assert [i["pid"] for i in infos] == [1, 1, 1]
        assert len({i["hostname"] for i in infos}) == 3
    finally:
        await backend.close()
