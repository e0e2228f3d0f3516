"""Stateful Python contexts (code.run / code.eval / context.*) on a real agent."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from agent_harness import AgentProcess
from forkd import protocol as p

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Run:
    def __init__(
        self, response: dict, out: bytes, err: bytes, notes: list, ended_first: bool, frames: list
    ) -> None:
        self.response = response
        self.frames = frames  # what the connection received for this run, in wire order
        self.stdout = out
        self.stderr = err
        self.notes = notes  # code.result notifications, in arrival order
        self.ended_first = ended_first  # stream.end arrived before the response

    @property
    def results(self) -> list[dict]:
        return self.response["results"]

    @property
    def error(self) -> dict | None:
        return self.response["error"]

    @property
    def main(self) -> dict | None:
        return next((r for r in self.results if r["is_main_result"]), None)


def _record_frames(conn) -> list:
    """Every message the connection receives, in wire order."""
    seen = getattr(conn, "_test_frames", None)
    if seen is None:
        seen = conn._test_frames = []
        dispatch = conn._dispatch

        def recording_dispatch(msg):
            seen.append(msg)
            dispatch(msg)

        conn._dispatch = recording_dispatch
    return seen


async def run(conn, code: str, window: int | None = None, **params) -> Run:
    frames = _record_frames(conn)
    sid = conn.new_stream_id()
    stream = conn.open_inbound(sid, window or p.DEFAULT_WINDOW)
    notes: list = []

    def on_note(_conn, method, note):
        if method == "code.result" and note["stream"] == sid:
            notes.append(note["result"])

    conn.on_notification = on_note
    req = {"code": code, "stream": sid, **params}
    if window:
        req["window"] = window
    start = len(frames)
    out, err = bytearray(), bytearray()

    async def drain():
        async for fd, _offset, data in stream:
            (out if fd == p.FD_STDOUT else err).extend(data)

    # Drained while the request runs: a small window needs the consumer's acks.
    consumer = asyncio.ensure_future(drain())
    try:
        response = await conn.request("code.run", req)
    except BaseException:
        consumer.cancel()
        await stream.close()
        raise
    await consumer
    mine = frames[start:]
    end_at = next(
        i
        for i, m in enumerate(mine)
        if type(m) is p.Notification and m.method == "stream.end" and m.params["stream"] == sid
    )
    response_at = next(i for i, m in enumerate(mine) if type(m) is p.Response and m.result is response)
    return Run(response, bytes(out), bytes(err), notes, end_at < response_at, mine)


async def text_of(conn, code: str, **params) -> str | None:
    r = await run(conn, code, **params)
    assert r.error is None, r.error
    return r.main["text"] if r.main else None


async def expect_error(coro, code: p.ErrorCode) -> p.RpcError:
    with pytest.raises(p.RpcError) as ei:
        await coro
    assert ei.value.code == code, ei.value
    return ei.value


# -- cells ----------------------------------------------------------------------


async def test_last_expression_is_the_main_result_and_state_persists(agent):
    r = await run(agent, "1")
    assert r.error is None
    assert [x["text"] for x in r.results] == ["1"]
    assert r.results[0]["is_main_result"] is True
    assert r.response["execution_count"] == 1

    r = await run(agent, "x = 20\ny = x + 1\n")
    assert r.results == [] and r.error is None
    assert r.response["execution_count"] == 2
    assert await text_of(agent, "x * 2 + y - 20") == "41"
    assert await text_of(agent, "x;") is None  # a trailing ';' hides the value, as in a notebook
    assert await text_of(agent, "'a' + 'b'") == "'ab'"


async def test_output_is_streamed_in_order_before_the_response(agent):
    code = (
        "import subprocess, sys\n"
        "for i in range(3000):\n"
        "    print(f'line {i}')\n"
        "print('to stderr', file=sys.stderr)\n"
        "subprocess.run(['echo', 'from a subprocess'])\n"
        "print('no newline', end='')\n"
        "'value'"
    )
    # A small window makes the agent wait for credit several times.
    r = await run(agent, code, window=8192)
    assert r.ended_first
    lines = r.stdout.decode().split("\n")
    assert lines[:3000] == [f"line {i}" for i in range(3000)]
    assert lines[3000:] == ["from a subprocess", "no newline"]
    assert r.stderr == b"to stderr\n"
    assert r.main["text"] == "'value'"


async def test_display_results_keep_their_place_in_the_output(agent):
    # The pipe still holds output when display()'s message reaches the agent.
    code = "import sys\nsys.stdout.write('A' * 1_000_000 + '\\n')\ndisplay('shown')\nprint('after')"
    r = await run(agent, code)
    assert r.stdout == b"A" * 1_000_000 + b"\nafter\n"
    before = 0
    for msg in r.frames:
        if type(msg) is p.Notification and msg.method == "code.result":
            break
        if type(msg) is p.StreamData:
            before += len(msg.data)
    assert before == 1_000_001


async def test_errors_name_value_traceback(agent):
    r = await run(agent, "a = 1\nundefined_name")
    assert r.error["name"] == "NameError"
    assert r.error["value"] == "name 'undefined_name' is not defined"
    assert 'File "<cell-1>", line 2' in r.error["traceback"]
    assert "forkd_agent" not in r.error["traceback"]
    assert await text_of(agent, "a") == "1"  # statements before the error ran

    r = await run(agent, "def f(:\n    pass")
    assert r.error["name"] == "SyntaxError"
    assert "invalid syntax" in r.error["value"]
    assert r.response["execution_count"] == 3  # failed cells count, as in a notebook

    r = await run(agent, "raise SystemExit(3)")
    assert r.error["name"] == "SystemExit"
    assert await text_of(agent, "a + 1") == "2"  # sys.exit() does not end the kernel


async def test_contexts_are_independent_and_restart_clears_state(agent):
    a = await agent.request("context.create", {})
    b = await agent.request("context.create", {"language": "python"})
    assert a["language"] == "python" and a["id"] != b["id"]
    await run(agent, "v = 'in a'", context=a["id"])
    await run(agent, "v = 'in b'", context=b["id"])
    assert await text_of(agent, "v", context=a["id"]) == "'in a'"
    assert await text_of(agent, "v", context=b["id"]) == "'in b'"
    r = await run(agent, "v")  # the default context is a third one
    assert r.error["name"] == "NameError"
    ids = {c["id"] for c in await agent.request("context.list")}
    assert ids == {a["id"], b["id"], "default"}

    assert (await agent.request("context.restart", {"id": a["id"]}))["id"] == a["id"]
    r = await run(agent, "v", context=a["id"])
    assert r.error["name"] == "NameError"
    assert r.response["execution_count"] == 1
    assert await text_of(agent, "v", context=b["id"]) == "'in b'"

    await agent.request("context.remove", {"id": b["id"]})
    await expect_error(run(agent, "1", context=b["id"]), p.ErrorCode.NOT_FOUND)
    await expect_error(agent.request("context.remove", {"id": b["id"]}), p.ErrorCode.NOT_FOUND)
    await expect_error(agent.request("code.eval", {"expr": "1", "context": "nope"}), p.ErrorCode.NOT_FOUND)


async def test_context_cwd_envs_and_run_envs(agent, tmp_path):
    (tmp_path / "helper_mod.py").write_text("VALUE = 'imported from cwd'\n")
    ctx = await agent.request("context.create", {"cwd": str(tmp_path), "envs": {"CTX_VAR": "c"}})
    assert ctx["cwd"] == str(tmp_path)
    cid = ctx["id"]
    code = "import os, helper_mod\n(os.getcwd(), os.environ.get('CTX_VAR'), os.environ.get('RUN_VAR'), helper_mod.VALUE)"
    assert await text_of(agent, code, context=cid, envs={"RUN_VAR": "r"}) == repr(
        (str(tmp_path), "c", "r", "imported from cwd")
    )
    # Run envs last for that run only.
    assert await text_of(agent, "os.environ.get('RUN_VAR')", context=cid) is None
    assert await text_of(agent, "os.environ['MPLBACKEND']", context=cid) == "'Agg'"


async def test_bad_arguments(agent):
    await expect_error(agent.request("context.create", {"language": "r"}), p.ErrorCode.INVALID_ARGUMENT)
    await expect_error(agent.request("context.create", {"cwd": "/no/such/dir"}), p.ErrorCode.INVALID_ARGUMENT)
    await expect_error(run(agent, "1", context="default", language="python"), p.ErrorCode.INVALID_ARGUMENT)
    await expect_error(run(agent, "1", language="javascript"), p.ErrorCode.INVALID_ARGUMENT)
    await expect_error(agent.request("code.run", {"code": 1, "stream": 1}), p.ErrorCode.INVALID_ARGUMENT)
    assert await text_of(agent, "1", language="python") == "1"


async def test_runs_on_one_context_keep_arrival_order(agent):
    first = asyncio.ensure_future(run(agent, "import time\ntime.sleep(0.2)\nseen = ['first']"))
    second = asyncio.ensure_future(agent.request("code.eval", {"expr": "seen + ['second']"}))
    await first
    assert (await second)["value"] == ["first", "second"]


# -- rich results -----------------------------------------------------------------


async def test_rich_results_follow_ipython_conventions(agent):
    code = (
        "class Rich:\n"
        "    def _repr_html_(self): return '<b>bold</b>'\n"
        "    def _repr_markdown_(self): return '**bold**'\n"
        "    def _repr_png_(self): return b'\\x89PNG\\r\\n\\x1a\\nrest'\n"
        "    def _repr_json_(self): return {'k': [1, 2]}\n"
        "    def __repr__(self): return 'Rich()'\n"
        "class Bundle:\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'text/plain': 'bundle', 'image/svg+xml': '<svg/>', 'application/x-custom': 'c'}\n"
        "class Broken:\n"
        "    def _repr_html_(self): raise ValueError('nope')\n"
        "    def __repr__(self): return 'Broken()'\n"
        "print('before')\n"
        "display(Bundle())\n"
        "display(Broken())\n"
        "Rich()"
    )
    r = await run(agent, code)
    assert r.error is None
    shown, broken, main = r.results
    assert (shown["text"], shown["svg"], shown["is_main_result"]) == ("bundle", "<svg/>", False)
    assert shown["extra"] == {"application/x-custom": "c"}
    assert broken["text"] == "Broken()" and broken["html"] is None
    assert b"nope" in r.stderr  # a failing repr method is reported, the cell succeeds
    assert main["is_main_result"] and main["text"] == "Rich()"
    assert main["html"] == "<b>bold</b>" and main["markdown"] == "**bold**"
    assert base64.b64decode(main["png"]).startswith(PNG_SIGNATURE)
    assert main["json"] == {"k": [1, 2]}
    # Display results were also sent as they happened; the main one only in the response.
    assert r.notes == [shown, broken]


async def test_matplotlib_figures_and_dataframes(agent):
    code = (
        "import matplotlib.pyplot as plt\n"
        "import pandas as pd\n"
        "plt.plot([1, 2, 3])\n"
        "plt.show()\n"  # shows and closes the first figure, as inline does
        "fig, ax = plt.subplots()\n"
        "ax.bar(['a', 'b'], [3, 4])\n"
        "plt.figure()\n"
        "plt.plot([3, 1])\n"  # left open: shown after the cell
        "display(pd.DataFrame({'A': [1, 2], 'B': ['x', 'y']}))\n"
        "fig"
    )
    r = await run(agent, code)
    assert r.error is None, r.error
    first, frame, main, leftover = r.results
    for fig in (first, main, leftover):
        assert fig["text"].startswith("<Figure size")
        assert base64.b64decode(fig["png"]).startswith(PNG_SIGNATURE)
    assert main["is_main_result"] and not first["is_main_result"] and not leftover["is_main_result"]
    assert "<table" in frame["html"] and "A" in frame["text"]
    assert frame["data"] == {"A": [1, 2], "B": ["x", "y"]}
    assert await text_of(agent, "len(plt.get_fignums())") == "0"  # all closed after the cell


# -- interrupts, timeouts, dead kernels -------------------------------------------


async def test_timeout_interrupts_and_the_context_keeps_its_state(agent):
    await run(agent, "kept = 41")
    err = await expect_error(run(agent, "while True: pass", timeout=0.3), p.ErrorCode.TIMEOUT)
    assert "keeps its state" in err.message
    assert await text_of(agent, "kept + 1") == "42"


async def test_kernel_ignoring_the_interrupt_is_killed_and_replaced(agent):
    await run(agent, "kept = 1")
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.01)"
    err = await expect_error(run(agent, code, timeout=0.2), p.ErrorCode.TIMEOUT)
    assert "state is lost" in err.message
    r = await run(agent, "kept")
    assert r.error["name"] == "NameError"
    assert r.response["execution_count"] == 1


async def test_code_interrupt(agent_proc):
    conn = await agent_proc.connect()
    other = await agent_proc.connect()
    try:
        assert (await other.request("code.interrupt", {}))["interrupted"] is False
        await run(conn, "kept = 'yes'")
        task = asyncio.ensure_future(run(conn, "import time\nfor _ in range(600): time.sleep(0.05)"))
        await asyncio.sleep(0.2)
        assert (await other.request("code.interrupt", {"context": "default"}))["interrupted"] is True
        r = await task
        assert r.error["name"] == "KeyboardInterrupt"
        assert "<cell-2>" in r.error["traceback"]
        assert await text_of(conn, "kept") == "'yes'"
    finally:
        await conn.close()
        await other.close()


async def test_dead_kernel_fails_the_run_and_the_next_run_gets_a_fresh_one(agent):
    await run(agent, "kept = 1")
    r = await run(agent, "print('bye', flush=True)\nimport os\nos._exit(7)")
    assert r.stdout == b"bye\n"
    assert r.error["name"] == "DeadKernelError"
    assert "exited with code 7" in r.error["value"]
    r = await run(agent, "kept")
    assert r.error["name"] == "NameError"
    assert await text_of(agent, "2 + 2") == "4"


async def test_removing_a_busy_context_ends_its_run_and_refuses_queued_ones(agent):
    cid = (await agent.request("context.create", {}))["id"]
    running = asyncio.ensure_future(run(agent, "import time\ntime.sleep(30)", context=cid))
    queued = asyncio.ensure_future(agent.request("code.eval", {"expr": "1", "context": cid}))
    await asyncio.sleep(0.1)
    await agent.request("context.remove", {"id": cid})
    r = await running
    assert r.error["name"] == "DeadKernelError" and "removed" in r.error["value"]
    await expect_error(queued, p.ErrorCode.NOT_FOUND)
    assert cid not in {c["id"] for c in await agent.request("context.list")}


async def test_a_dropped_client_interrupts_its_run(agent_proc):
    conn = await agent_proc.connect()
    await run(conn, "kept = 'still here'")
    task = asyncio.ensure_future(run(conn, "while True: pass"))
    await asyncio.sleep(0.2)
    task.cancel()
    await conn.close()
    conn = await agent_proc.connect()
    try:
        assert await asyncio.wait_for(text_of(conn, "kept"), 5) == "'still here'"
    finally:
        await conn.close()


# -- eval, warm kernels, reseed ---------------------------------------------------


async def test_code_eval_returns_value_and_text(agent):
    await run(agent, "data = {'a': [1, 2.5, None, True], 'b': b'\\x00'}")
    r = await agent.request("code.eval", {"expr": "data"})
    assert r["value"] == {"a": [1, 2.5, None, True], "b": b"\x00"}
    assert r["text"] == "{'a': [1, 2.5, None, True], 'b': b'\\x00'}"
    assert r["error"] is None
    r = await agent.request("code.eval", {"expr": "object()"})
    assert r["value"] is None and r["text"].startswith("<object object at")
    r = await agent.request("code.eval", {"expr": "1/0"})
    assert r["error"]["name"] == "ZeroDivisionError" and r["text"] is None
    r = await agent.request("code.eval", {"expr": "x = 1"})
    assert r["error"]["name"] == "SyntaxError"
    # eval leaves the execution count alone.
    assert (await run(agent, "1")).response["execution_count"] == 2


async def test_warm_agent_gives_warm_kernels(tmp_path):
    agent_proc = AgentProcess(
        tmp_path, warmup="import fractions, numpy.random, sys\nsys.forkd_test_marker = 42\nWARM = 1"
    )
    try:
        conn = await agent_proc.connect()
        code = "import sys\n('fractions' in sys.modules, sys.forkd_test_marker, 'WARM' in globals())"
        assert await text_of(conn, code) == "(True, 42, False)"
        # Sibling kernels forked from one agent must not share numpy's random stream.
        other = (await conn.request("context.create", {}))["id"]
        draw = "import numpy\nnumpy.random.random()"
        assert await text_of(conn, draw) != await text_of(conn, draw, context=other)
        await conn.close()
    finally:
        agent_proc.stop()


async def test_reseed_changes_every_kernels_random_sequence(agent):
    other = (await agent.request("context.create", {}))["id"]
    setup = "import random, numpy\nrandom.seed(7)\nnumpy.random.seed(7)"
    draw = "(random.random(), float(numpy.random.random()))"
    await run(agent, setup)
    before = await text_of(agent, draw)
    await run(agent, setup)
    await run(agent, setup, context=other)
    # identity.refresh (after a sandbox fork) hands its entropy to the contexts' reseed().
    report = await agent.request("identity.refresh", {"entropy": os.urandom(32)})
    assert report["kernels_reseeded"] == 2
    after = await text_of(agent, draw)
    after_other = await text_of(agent, draw, context=other)
    a, b = eval(after), eval(after_other)
    x = eval(before)
    assert a[0] != x[0] and a[1] != x[1]
    assert a != b
