"""BRANCH on the process backend: code contexts and files carried into the
children of a live sandbox's capture (files alone: test_process_capture.py)."""

import asyncio

import pytest

from forkd_runtime._backend import BranchBusy, BranchError, SnapshotInUse
from process_helpers import check, eval_in, run, run_code

SETUP = """
import numpy as np
counter = 41
data = np.arange(1000)
big = np.full(1 << 18, 7.0)  # 2 MiB: travels out of band, mapped by the children
def bump(n=1):
    global counter
    counter += n
    return counter
class Tally:
    def __init__(self): self.items = []
    def add(self, x): self.items.append(x); return len(self.items)
tally = Tally()
tally.add("before")
gen = (i for i in range(3))  # generators do not pickle: reported, not fatal
"""


async def _source(backend):
    snap = await backend.prepare("base")
    (source,) = await backend.spawn(snap, 1)
    result = await run_code(source, SETUP)
    assert result["error"] is None, result
    return source


async def test_children_inherit_variables_functions_and_objects_then_diverge(process_backend):
    source = await _source(process_backend)
    ctx = await source.conn.request("context.create", {"cwd": "/tmp", "envs": {"ROLE": "second"}})
    assert (await run_code(source, "import os; word = 'hi ' + os.environ['ROLE']", ctx["id"]))[
        "error"
    ] is None

    captured = await process_backend.capture(source)
    meta = captured.meta
    assert meta["pause_s"] == pytest.approx(meta["pause_kernels_s"] + meta["pause_files_s"])
    assert any(n["what"] == "variable gen of context default" for n in meta["not_inherited"])
    a, b = await process_backend.spawn(captured, 2)
    for kid in (a, b):
        assert await eval_in(kid, "counter") == 41
        assert await eval_in(kid, "int(data.sum())") == 499500
        assert await eval_in(kid, "float(big.sum())") == 7.0 * (1 << 18)
        assert await eval_in(kid, "tally.items") == ["before"]
        assert await eval_in(kid, "word", ctx["id"]) == "hi second"  # the second context, same id
        assert await eval_in(kid, "os.getcwd()", ctx["id"]) == "/tmp"
        assert await eval_in(kid, "'gen' in globals()") is False
    # Mapped arrays are the child's own as soon as it writes them.
    assert await eval_in(a, "big.__setitem__(0, 100.0) or float(big[0])") == 100.0
    assert await eval_in(b, "float(big[0])") == 7.0
    assert await eval_in(source, "float(big[0])") == 7.0
    # Functions defined in cells work on the child's own globals.
    assert await eval_in(a, "bump(10)") == 51
    assert await eval_in(a, "counter") == 51
    assert await eval_in(b, "counter") == 41
    assert await eval_in(source, "counter") == 41
    assert await eval_in(source, "bump()") == 42  # the source keeps working
    assert await eval_in(b, "counter") == 41
    # Execution counts continue from the source's.
    assert (await run_code(b, "1"))["execution_count"] == 2
    # A cell's output is the child's own.
    assert (await run_code(a, "print(tally.add('a'))"))["stdout"] == "2\n"
    assert await eval_in(b, "len(tally.items)") == 1


async def test_a_chain_of_five_branches_carries_state_down(process_backend):
    kid = await _source(process_backend)
    pauses = []
    for depth in range(1, 6):
        assert (await run_code(kid, f"steps = globals().get('steps', []) + [{depth}]"))["error"] is None
        await check(kid, f"echo {depth} > /tmp/step{depth}")
        snap = await process_backend.capture(kid)
        pauses.append(snap.meta["pause_s"])
        (kid,) = await process_backend.spawn(snap, 1)
    assert await eval_in(kid, "steps") == [1, 2, 3, 4, 5]
    assert (await check(kid, "cat /tmp/step1 /tmp/step5")).split() == ["1", "5"]
    print("pause_s by depth:", [round(p, 4) for p in pauses])


async def test_busy_dead_and_concurrent_branches(process_backend):
    snap = await process_backend.prepare("base")
    s1, s2 = await process_backend.spawn(snap, 2)
    await run_code(s1, "x = 1")
    await run_code(s2, "x = 2")
    # Code running in a context: the branch is refused, typed, and the sandbox is unharmed.
    long_run = asyncio.ensure_future(
        run_code(s1, "import time; open('/tmp/started', 'w').close(); time.sleep(1.5); x = 10")
    )
    while (await run(s1, "test -e /tmp/started")).exit_code != 0:
        await asyncio.sleep(0.05)
    with pytest.raises(BranchBusy):
        await process_backend.capture(s1)
    assert (await long_run)["error"] is None
    # Two sources at once.
    c1, c2 = await asyncio.gather(process_backend.capture(s1), process_backend.capture(s2))
    (k1,) = await process_backend.spawn(c1, 1)
    (k2,) = await process_backend.spawn(c2, 1)
    assert (await eval_in(k1, "x"), await eval_in(k2, "x")) == (10, 2)
    # A dead sandbox.
    await process_backend.kill(s2)
    with pytest.raises(BranchError):
        await process_backend.capture(s2)


async def test_snapshot_deletion_waits_for_its_dependents(process_backend):
    source = await _source(process_backend)
    first = await process_backend.capture(source)
    (kid,) = await process_backend.spawn(first, 1)
    second = await process_backend.capture(kid)
    seeds = process_backend._zygotes["base"].run_dir / "seeds"
    with pytest.raises(SnapshotInUse, match=kid.id):
        await process_backend.delete_snapshot(first)
    await process_backend.kill(kid)
    with pytest.raises(SnapshotInUse, match=second.id):  # stacked on it
        await process_backend.delete_snapshot(first)
    await process_backend.delete_snapshot(second)
    await process_backend.delete_snapshot(first)
    assert not (seeds / first.id).exists() and not (seeds / first.meta["state"]).exists()
    assert not (seeds / second.id).exists()
    # The source is untouched by all of it.
    assert await eval_in(source, "counter") == 41


async def test_a_symlinked_layer_never_leads_the_host_outside_the_sandbox(process_backend):
    """Sandbox root swaps directories for symlinks to host paths: the capture copies
    the symlinks, never what they point to on the host."""
    snap = await process_backend.prepare("base")
    (source,) = await process_backend.spawn(snap, 1)
    await check(source, "mkdir -p /srv/x && ln -s /etc /srv/hostetc && ln -s / /srv/root")
    captured = await process_backend.capture(source)
    layer = process_backend._zygotes["base"].run_dir / "seeds" / captured.id
    assert (layer / "srv" / "hostetc").is_symlink()
    assert not (layer / "srv" / "hostetc").resolve().is_relative_to(layer)
    (kid,) = await process_backend.spawn(captured, 1)
    assert (await run(kid, "readlink /srv/hostetc")).text.strip() == "/etc"
