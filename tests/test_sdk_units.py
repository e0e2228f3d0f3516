"""The SDK without a real gateway: models, configuration, argument checks, connection sharing, heartbeats.

A scripted peer on an in-memory transport stands in for the gateway where a test
needs one answer or a silence; everything a sandbox does is tested against the
real gateway in test_sdk_async.py / test_sdk_sync.py and compat_tests/.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

import forkd
from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import memory_pair

INFO = {
    "sandbox_id": "sbx-1",
    "template_id": "base",
    "name": "base",
    "metadata": {"k": "v"},
    "started_at": 1_700_000_000.0,
    "end_at": 1_700_000_300.0,
    "state": "running",
    "cpu_count": 1,
    "memory_mb": 512,
    "envs": {},
}


class FakeGateway:
    """Answers hello and a few methods; ``silent`` stops answering anything (a hung gateway)."""

    def __init__(self, pages: list[dict] | None = None) -> None:
        self.connections = 0
        self.calls: list[tuple[str, dict]] = []
        self.silent = False
        self.pages = pages or []

    async def factory(self):
        client_end, server_end = memory_pair()
        self.connections += 1
        Connection(server_end, self.handle, name="fake-gateway").start()
        return client_end

    async def handle(self, conn, method, params):
        self.calls.append((method, params))
        if self.silent:
            await asyncio.Event().wait()
        if method == "hello":
            return {"version": 1, "gateway": "fake", "key_id": "local"}
        if method in ("sandbox.create", "sandbox.info", "sandbox.connect"):
            return {**INFO, "sandbox_id": params.get("sandbox_id", "sbx-1")}
        if method == "sandbox.kill":
            return params["sandbox_id"] == "sbx-1"
        if method == "sandbox.list":
            return self.pages.pop(0)
        if method == "ping":
            return {"pong": True}
        raise p.RpcError(p.ErrorCode.UNKNOWN_METHOD, method)


# -- the package -----------------------------------------------------------------


def test_import_is_lazy_and_third_party_free():
    code = (
        "import sys\n"
        "for m in ('websockets', 'httpx'):\n"
        "    sys.modules[m] = None\n"
        "import forkd, forkd.protocol\n"
        "assert 'forkd._sync' not in sys.modules and 'forkd._sandbox' not in sys.modules, sorted(sys.modules)\n"
        "from forkd import Sandbox, AsyncSandbox, CommandExitException\n"
        "assert 'websockets' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_every_public_name_resolves():
    for name in forkd.__all__:
        assert getattr(forkd, name) is not None, name
    with pytest.raises(AttributeError):
        forkd.NoSuchThing  # noqa: B018


def test_e2b_module_paths():
    from forkd.exceptions import SandboxException, TimeoutException
    from forkd.models import Execution, Result
    from forkd.sandbox.commands.command_handle import CommandExitException, CommandResult, PtySize
    from forkd.sandbox.filesystem.filesystem import EntryInfo, FileType
    from forkd.sandbox.filesystem.watch_handle import FilesystemEventType
    from forkd.sandbox_async.commands.command_handle import AsyncCommandHandle
    from forkd.sandbox_sync.commands.command_handle import CommandHandle

    assert CommandExitException is forkd.CommandExitException
    assert (CommandResult, PtySize, EntryInfo, FileType) == (
        forkd.CommandResult,
        forkd.PtySize,
        forkd.EntryInfo,
        forkd.FileType,
    )
    assert FilesystemEventType.WRITE.value == "write"
    assert (AsyncCommandHandle, CommandHandle) == (forkd.AsyncCommandHandle, forkd.CommandHandle)
    assert issubclass(TimeoutException, SandboxException)
    assert Execution is forkd.Execution and Result is forkd.Result
    with pytest.raises(ImportError):
        from forkd.sandbox.commands.command_handle import NoSuchName  # noqa: F401


# -- models -----------------------------------------------------------------------


def test_command_exit_exception_is_a_result_and_an_exception():
    e = forkd.CommandExitException(stderr="boom\n", stdout="out", exit_code=3, error="exit status 3")
    assert isinstance(e, forkd.SandboxException) and isinstance(e, forkd.CommandResult)
    assert str(e) == "Command exited with code 3 and error:\nboom\n"
    assert (e.stdout, e.stderr, e.exit_code, e.error, e.status_code) == (
        "out",
        "boom\n",
        3,
        "exit status 3",
        None,
    )
    with pytest.raises(forkd.CommandExitException):
        raise e
    assert {e}  # hashable, as exceptions must be


def test_exception_hierarchy_matches_e2b():
    assert issubclass(forkd.SandboxNotRunningException, forkd.TimeoutException)
    assert issubclass(forkd.SandboxUnreachableException, forkd.TimeoutException)
    assert issubclass(forkd.FileNotFoundException, forkd.NotFoundException)
    assert issubclass(forkd.SandboxNotFoundException, forkd.NotFoundException)
    assert not issubclass(forkd.AuthenticationException, forkd.SandboxException)
    assert not issubclass(forkd.ServiceBusyException, forkd.SandboxException)
    assert forkd.SandboxException("x").status_code is None


def test_code_models():
    main = forkd.Result(text="42", html="<b>42</b>", is_main_result=True, future_field=1)
    shown = forkd.Result(png="aGk=", extra={"application/x": 1})
    ex = forkd.Execution(results=[shown, main], logs=forkd.Logs(stdout=["a\n"]))
    assert ex.text == "42"
    assert list(main.formats()) == ["text", "html"]
    assert list(shown.formats()) == ["png", "application/x"]
    assert main["html"] == "<b>42</b>" and repr(main) == "Result(42)"
    assert forkd.Context("c1", "python", "/home/user").id == "c1"
    err = forkd.ExecutionError("NameError", "name 'x' is not defined", "tb")
    assert '"NameError"' in err.to_json()


def test_sandbox_info_from_the_wire():
    info = forkd.SandboxInfo._from_wire(INFO)
    assert info.state is forkd.SandboxState.RUNNING and info.state == "running"
    assert info.started_at.timestamp() == 1_700_000_000.0 and info.started_at.tzinfo is not None
    assert (info.end_at - info.started_at).total_seconds() == 300
    assert info.metadata == {"k": "v"} and info.template_id == "base"


def test_process_info_looks_like_e2b():
    info = forkd.ProcessInfo._from_wire(
        {"pid": 7, "tag": None, "cmd": "sleep 1", "envs": {"A": "1"}, "cwd": "/"}
    )
    assert (info.cmd, info.args, info.envs) == ("/bin/bash", ["-l", "-c", "sleep 1"], {"A": "1"})


# -- configuration ----------------------------------------------------------------


def test_config_from_environment(monkeypatch):
    monkeypatch.delenv("FORKD_URL", raising=False)
    monkeypatch.delenv("FORKD_API_KEY", raising=False)
    monkeypatch.setenv("E2B_API_KEY", "e2b-key")
    c = forkd.ConnectionConfig()
    assert (c.url, c.api_key, c.request_timeout) == ("http://127.0.0.1:49982", "e2b-key", 60.0)
    monkeypatch.setenv("FORKD_API_KEY", "forkd-key")
    monkeypatch.setenv("FORKD_URL", "https://gw.example:8443/")
    c = forkd.ConnectionConfig(request_timeout=0)
    assert (c.url, c.api_key, c.request_timeout) == ("https://gw.example:8443", "forkd-key", None)
    assert c.get_request_timeout(5) == 5 and c.get_request_timeout(0) is None
    assert forkd.ConnectionConfig(api_key="explicit").api_key == "explicit"
    # E2B's options are accepted (and unused)
    forkd.ConnectionConfig(domain="e2b.app", debug=False, proxy=None, headers={"a": "b"})


def test_get_host():
    sbx = forkd.AsyncSandbox("sbx-9", forkd.ConnectionConfig(url="http://gw.local:49982"))
    assert sbx.get_host(8080) == "8080-sbx-9.gw.local:49982"


# -- argument checks (no gateway needed) ---------------------------------------------


def _offline() -> forkd.ConnectionConfig:
    async def never():
        raise AssertionError("this call must not connect")

    return forkd.ConnectionConfig(transport_factory=never)


async def test_language_and_context_together_are_refused():
    sbx = forkd.AsyncSandbox("sbx-1", _offline())
    with pytest.raises(forkd.InvalidArgumentException):
        await sbx.run_code("1", language="python", context=forkd.Context("c", "python", "/"))


async def test_list_depth_below_one_is_refused():
    sbx = forkd.AsyncSandbox("sbx-1", _offline())
    with pytest.raises(forkd.InvalidArgumentException):
        await sbx.files.list("/", depth=0)


async def test_unsupported_create_options_are_refused():
    with pytest.raises(forkd.InvalidArgumentException):
        await forkd.AsyncSandbox.create(
            network={"deny_out": ["0.0.0.0/0"]}, transport_factory=_offline().transport_factory
        )


async def test_unreachable_gateway():
    t0 = time.monotonic()
    with pytest.raises(forkd.SandboxUnreachableException):
        await forkd.AsyncSandbox.create(url="http://127.0.0.1:1", request_timeout=5)
    assert time.monotonic() - t0 < 5


# -- the shared connection ------------------------------------------------------------


async def test_sandboxes_share_one_connection_and_create_is_one_request():
    gw = FakeGateway()
    sandboxes = await asyncio.gather(
        *(forkd.AsyncSandbox.create(transport_factory=gw.factory) for _ in range(5))
    )
    assert gw.connections == 1
    assert [m for m, _ in gw.calls] == ["hello"] + ["sandbox.create"] * 5
    assert gw.calls[1][1] == {"template": "base", "timeout": 300}
    info = await sandboxes[0].get_info()
    assert info.sandbox_id == "sbx-1" and gw.connections == 1


async def test_dual_methods():
    gw = FakeGateway()
    sbx = await forkd.AsyncSandbox.create(transport_factory=gw.factory)
    assert await sbx.kill() is True
    assert await forkd.AsyncSandbox.kill("sbx-1", transport_factory=gw.factory) is True
    assert await forkd.AsyncSandbox.kill("sbx-other", transport_factory=gw.factory) is False
    assert await forkd.AsyncSandbox.kill(sbx) is True  # the instance passed explicitly
    other = await forkd.AsyncSandbox.connect("sbx-7", transport_factory=gw.factory)
    assert other.sandbox_id == "sbx-7"
    assert (await forkd.AsyncSandbox.get_info("sbx-7", transport_factory=gw.factory)).sandbox_id == "sbx-7"
    assert await other.connect() is other


async def test_paginator():
    gw = FakeGateway(pages=[{"items": [INFO], "next_token": "t1"}, {"items": [], "next_token": None}])
    pager = forkd.AsyncSandbox.list(
        forkd.SandboxQuery(metadata={"k": "v"}, state=[forkd.SandboxState.RUNNING]),
        limit=1,
        transport_factory=gw.factory,
    )
    assert pager.has_next and pager.next_token is None
    assert [i.sandbox_id for i in await pager.next_items()] == ["sbx-1"]
    assert pager.has_next and pager.next_token == "t1"
    assert await pager.next_items() == []
    assert not pager.has_next
    with pytest.raises(Exception, match="No more items"):
        await pager.next_items()
    sent = [params for method, params in gw.calls if method == "sandbox.list"]
    assert sent == [
        {"metadata": {"k": "v"}, "state": ["running"], "limit": 1},
        {"metadata": {"k": "v"}, "state": ["running"], "limit": 1, "next_token": "t1"},
    ]


async def test_request_timeout():
    gw = FakeGateway()
    sbx = await forkd.AsyncSandbox.create(transport_factory=gw.factory)
    gw.silent = True
    with pytest.raises(forkd.TimeoutException, match="request_timeout"):
        await sbx.get_info(request_timeout=0.2)


async def test_silent_gateway_is_declared_dead():
    gw = FakeGateway()
    opts = {"transport_factory": gw.factory, "heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
    sbx = await forkd.AsyncSandbox.create(**opts)
    gw.silent = True
    t0 = time.monotonic()
    with pytest.raises(forkd.SandboxUnreachableException):
        await sbx.get_info()
    assert time.monotonic() - t0 < 10
    assert any(m == "ping" for m, _ in gw.calls)
    # the next call opens a new connection
    gw.silent = False
    assert (await sbx.get_info()).sandbox_id == "sbx-1"
    assert gw.connections == 2


# -- the synchronous layer -------------------------------------------------------------


def test_sync_layer_over_the_fake_gateway():
    gw = FakeGateway(pages=[{"items": [INFO], "next_token": None}])
    sbx = forkd.Sandbox.create(transport_factory=gw.factory, metadata={"k": "v"})
    assert isinstance(sbx, forkd.Sandbox) and sbx.sandbox_id == "sbx-1"
    assert sbx.get_info().template_id == "base"
    assert forkd.Sandbox.kill("nope", transport_factory=gw.factory) is False
    pager = forkd.Sandbox.list(transport_factory=gw.factory)
    assert [i.sandbox_id for i in pager.next_items()] == ["sbx-1"] and not pager.has_next
    with pytest.raises(Exception, match="No more items"):
        pager.next_items()
    with sbx:
        pass
    assert ("sandbox.kill", {"sandbox_id": "sbx-1"}) in gw.calls
    assert gw.connections == 1
