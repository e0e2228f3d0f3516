"""The process backend's happy path: a warm zygote forks children that answer."""


async def test_spawn_exec_kill(process_backend):
    snap = await process_backend.prepare("base")
    assert snap.meta["warm"]["marker"]  # the template's warm-up ran in the zygote
    kids = await process_backend.spawn(snap, 3)
    assert len(kids) == 3
    infos = [await k.conn.request("info") for k in kids]
    assert [i["pid"] for i in infos] == [1, 1, 1]  # each agent is PID 1 of its own namespace
    assert len({i["hostname"] for i in infos}) == 3
    for k in kids:
        await process_backend.kill(k)
    assert process_backend.children() == []
