"""Gateway configuration (TOML, options, environment), API keys, and the lease timer."""

import asyncio
from pathlib import Path

import pytest

from forkd_gateway._auth import (
    ApiKeys,
    AuthConfigError,
    check_bind,
    is_loopback_client,
    is_loopback_host,
    key_from_request,
)
from forkd_gateway._config import ConfigError, PoolConfig, load_config, parse_pool_option
from forkd_gateway._leases import Leases
from forkd_gateway.cli import build_parser, serve_config


def test_toml_config(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalice:key-a\n\nkey-anonymous\n")
    cfg_file = tmp_path / "forkd.toml"
    cfg_file.write_text(
        f"""
host = "0.0.0.0"
port = 5000
backend = "process"
state_dir = "{tmp_path}/state"
default_timeout = 60
api_keys_file = "{keys}"
api_keys = ["bob:key-b"]
audit_log = ""
[pools]
base = 3
code-interpreter = {{ min_ready = 1, max_total = 5 }}
[limits]
memory_mb = 256
"""
    )
    cfg = load_config(cfg_file, env={"FORKD_API_KEYS": "carol:key-c, key-d"})
    assert (cfg.host, cfg.port, cfg.backend, cfg.default_timeout) == ("0.0.0.0", 5000, "process", 60.0)
    assert cfg.resolved_state_dir() == tmp_path / "state"
    assert cfg.resolved_templates_dir() == tmp_path / "state"
    assert cfg.resolved_audit_log() is None
    assert cfg.pools == {"base": PoolConfig(3, 0), "code-interpreter": PoolConfig(1, 5)}
    assert cfg.pool_max(cfg.pools["base"]) == cfg.default_max_total
    assert cfg.limits.memory_mb == 256 and cfg.limits.pids == 512
    ids = cfg.keys.ids()
    assert {"alice", "bob", "carol"} <= set(ids) and len(ids) == 5
    assert cfg.keys.lookup("key-b") == "bob" and cfg.keys.lookup("key-anonymous").startswith("key-")
    check_bind(cfg.host, cfg.keys)  # keys configured: a network address is fine


@pytest.mark.parametrize(
    "text",
    [
        "bogus = 1",
        "port = 'x'",
        "backend = 'qemu'",
        "[pools]\nbase = 'many'",
        "[pools]\nbase = { min_ready = 5, max_total = 2 }",
        "[limits]\nmemory_mb = 1",
        "[limits]\ngpus = 1",
        "api_keys = ['a:k1', 'a:k2']",
        "api_keys = ['has space']",
        "default_timeout = 0",
        "this is not toml",
    ],
)
def test_bad_config_is_refused_with_a_message(tmp_path, text):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError):
        load_config(f, env={}).validate()


def test_serve_options_override_the_file(tmp_path):
    keys = tmp_path / "k"
    keys.write_text("ops:opskey\n")
    args = build_parser().parse_args(
        ["--state-dir", str(tmp_path / "s"), "serve", "--port", "6000", "--pool", "base=2:9", "--pool", "ci=0",
         "--api-keys-file", str(keys), "--host", "0.0.0.0", "--backend", "process", "--default-timeout", "30"]
    )  # fmt: skip
    cfg = serve_config(args)
    assert (cfg.port, cfg.host, cfg.backend, cfg.default_timeout) == (6000, "0.0.0.0", "process", 30.0)
    assert cfg.pools["base"] == PoolConfig(2, 9) and cfg.pools["ci"] == PoolConfig(0, 0)
    assert cfg.resolved_state_dir() == tmp_path / "s"
    assert cfg.keys.lookup("opskey") == "ops"
    sub = build_parser().parse_args(["serve", "--state-dir", str(tmp_path / "t")])
    assert serve_config(sub).resolved_state_dir() == tmp_path / "t"
    with pytest.raises(SystemExit, match="without API keys"):
        serve_config(build_parser().parse_args(["serve", "--host", "0.0.0.0"]))
    for bad in ("base", "base=x", "=3", "base=5:2"):
        with pytest.raises(ConfigError):
            parse_pool_option(bad)


def test_api_keys():
    keys = ApiKeys()
    keys.add_entries(["alice:secret-a", "secret-b", "  # comment", ""], "test")
    assert keys.lookup("secret-a") == "alice"
    assert keys.lookup("secret-b").startswith("key-") and "secret" not in keys.lookup("secret-b")
    for wrong in (None, "", "secret-", "secret-aa", "SECRET-A"):
        assert keys.lookup(wrong) is None
    with pytest.raises(AuthConfigError):
        keys.add("other", "alice")  # a name cannot mean two keys
    keys.add("secret-a", "alice")  # the same entry twice is harmless
    with pytest.raises(AuthConfigError):
        ApiKeys().add_file(Path("/nonexistent/keys"))
    assert not ApiKeys()


def test_key_from_request_and_loopback():
    assert key_from_request({"authorization": "Bearer k1"}, []) == "k1"
    assert key_from_request({"authorization": "bearer   k1 "}, []) == "k1"
    assert key_from_request({"authorization": "Basic abc"}, []) is None
    assert key_from_request({"x-api-key": "k2"}, []) == "k2"
    assert key_from_request({}, ["forkd.v1", "forkd.key.k3"]) == "k3"
    assert key_from_request({}, ["forkd.v1"]) is None
    assert all(map(is_loopback_host, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback_host, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))
    assert is_loopback_client(None) and is_loopback_client("::ffff:127.0.0.1")
    assert not is_loopback_client("192.168.1.2") and not is_loopback_client("garbage")
    with pytest.raises(AuthConfigError):
        check_bind("0.0.0.0", ApiKeys())
    check_bind("127.0.0.1", ApiKeys())


async def test_leases_expire_in_deadline_order_and_can_be_rearmed():
    expired: list[str] = []

    async def on_expire(key):
        expired.append(key)

    leases = Leases(on_expire)
    leases.start()
    try:
        leases.set("slow", 0.3)
        leases.set("fast", 0.05)
        leases.set("gone", 0.05)
        leases.discard("gone")
        leases.set("moved", 0.05)
        leases.set("moved", 0.2)  # extended: its first deadline must not fire
        for _ in range(100):
            if len(expired) == 3:
                break
            await asyncio.sleep(0.02)
        assert expired == ["fast", "moved", "slow"]
        assert len(leases) == 0 and leases.remaining("slow") is None
        for i in range(500):  # re-arming many times does not grow the heap without bound
            leases.set("busy", 100 + i)
        assert len(leases._heap) < 600
    finally:
        await leases.close()
