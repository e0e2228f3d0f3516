"""Capturing a live sandbox's files as a layer new sandboxes stack on (the process backend's part of BRANCH)."""

from process_helpers import check, run


async def test_children_of_a_capture_inherit_the_files_then_diverge(process_backend):
    snap = await process_backend.prepare("base")
    (source,) = await process_backend.spawn(snap, 1)
    await check(
        source, "echo before > /root/note && echo changed > /etc/issue && rm /etc/debian_version", user="root"
    )
    await check(source, "mkdir -p proj && echo 42 > proj/answer", user="user")

    captured = await process_backend.capture(source)
    assert captured.parent is snap and captured.meta["pause_s"] < 5
    a, b = await process_backend.spawn(captured, 2)
    for kid in (a, b):
        assert (await check(kid, "cat /root/note", user="root")).strip() == "before"
        assert (await check(kid, "cat /etc/issue")).strip() == "changed"
        assert (await run(kid, "test -e /etc/debian_version")).exit_code == 1  # deletions carry over too
        assert (await check(kid, "cat proj/answer", user="user")).strip() == "42"  # in the user's home
        assert (await check(kid, "stat -c %U proj/answer", user="user")).strip() == "user"  # owner kept

    # Divergence: each writes its own; nobody else sees it. The source keeps working.
    await check(a, "echo a > /root/mine", user="root")
    await check(source, "echo after > /root/note", user="root")
    assert (await run(b, "test -e /root/mine", user="root")).exit_code == 1
    assert (await run(source, "test -e /root/mine", user="root")).exit_code == 1
    assert (await check(a, "cat /root/note", user="root")).strip() == "before"
    assert (await check(source, "cat /root/note", user="root")).strip() == "after"


async def test_captures_chain_and_each_step_copies_only_its_own_changes(process_backend):
    snap = await process_backend.prepare("base")
    (kid,) = await process_backend.spawn(snap, 1)
    for depth in range(1, 6):
        await check(kid, f"echo {depth} > /tmp/step{depth}")
        snap = await process_backend.capture(kid)
        (kid,) = await process_backend.spawn(snap, 1)
    assert len(snap.meta["seeds"]) == 5
    out = await check(kid, "cat /tmp/step1 /tmp/step2 /tmp/step3 /tmp/step4 /tmp/step5")
    assert out.split() == ["1", "2", "3", "4", "5"]
    # The last layer holds only the last step's change, not the whole chain.
    zygote = process_backend._zygotes["base"]
    last = zygote.run_dir / "seeds" / snap.meta["seeds"][0]
    assert sorted(p.name for p in (last / "tmp").iterdir()) == ["step5"]
