"""The gateway's configuration: defaults, a TOML file, the environment and command-line options.

Precedence, lowest first: built-in defaults, the TOML file (``--config``), the environment
(``FORKD_API_KEYS``, ``FORKD_STATE_DIR``), command-line options. API keys from every source are merged.

Example ``forkd.toml``::

    host = "127.0.0.1"
    port = 49982
    backend = "auto"              # auto | process (| vm where available)
    state_dir = "/var/lib/forkd"
    templates_dir = "/var/lib/forkd"   # where `forkd template build` put the templates (default: state_dir)
    default_timeout = 300         # sandbox lease in seconds when create() names none
    max_timeout = 86400
    api_keys_file = "/etc/forkd/api-keys"
    api_keys = ["alice:s3cret"]   # or plain keys
    audit_log = "/var/lib/forkd/audit.log"   # "" disables it
    heartbeat = 10                # ping clients idle this long (s); 0 = never

    [pools]
    base = 4                      # min_ready (max_total defaults to default_max_total)
    code-interpreter = { min_ready = 2, max_total = 50 }

    [limits]                      # per sandbox
    memory_mb = 512
    cpus = 1
    pids = 512
    disk_mb = 1024
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from forkd_runtime._backend import Limits

from ._auth import ENV_VAR, ApiKeys, AuthConfigError

__all__ = ["GatewayConfig", "PoolConfig", "ConfigError", "load_config", "parse_pool_option", "BACKENDS"]

BACKENDS = ("auto", "process", "vm")
DEFAULT_PORT = 49982


class ConfigError(ValueError):
    pass


@dataclass
class PoolConfig:
    min_ready: int = 0
    max_total: int = 0  # 0: the gateway's default_max_total

    def validate(self, name: str) -> None:
        if self.min_ready < 0 or self.max_total < 0:
            raise ConfigError(f"pool {name}: sizes must be >= 0")
        if self.max_total and self.min_ready > self.max_total:
            raise ConfigError(f"pool {name}: min_ready {self.min_ready} > max_total {self.max_total}")


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    backend: str = "auto"
    state_dir: Path | None = None  # None: $FORKD_STATE_DIR or /var/lib/forkd
    templates_dir: Path | None = None  # None: state_dir
    default_timeout: float = 300.0
    max_timeout: float = 86400.0
    default_template: str = "base"
    # Templates without a [pools] entry get a pool on first use: nothing kept ready, this many at most.
    default_max_total: int = 256
    pools: dict[str, PoolConfig] = field(default_factory=lambda: {"base": PoolConfig(min_ready=4)})
    # Wait at start until every pool has min_ready children (a failing template then fails the start).
    wait_for_pools: bool = True
    limits: Limits = field(default_factory=Limits)
    keys: ApiKeys = field(default_factory=ApiKeys)
    audit_log: str | os.PathLike | None = None  # None: <state_dir>/audit.log; "" or "-": no audit log
    heartbeat: float = 10.0
    max_streams_per_session: int = 1024
    log_level: str = "info"

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir or os.environ.get("FORKD_STATE_DIR") or "/var/lib/forkd")

    def resolved_templates_dir(self) -> Path:
        return Path(self.templates_dir) if self.templates_dir else self.resolved_state_dir()

    def resolved_audit_log(self) -> Path | None:
        if self.audit_log is None:
            return self.resolved_state_dir() / "audit.log"
        return None if str(self.audit_log) in ("", "-") else Path(self.audit_log)

    def pool_max(self, pool: PoolConfig) -> int:
        return pool.max_total or max(self.default_max_total, pool.min_ready)

    def validate(self) -> GatewayConfig:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"bad port {self.port}")
        if not 0 < self.default_timeout <= self.max_timeout:
            raise ConfigError("need 0 < default_timeout <= max_timeout")
        if self.default_max_total < 1:
            raise ConfigError("default_max_total must be >= 1")
        if self.heartbeat < 0:
            raise ConfigError("heartbeat must be >= 0")
        for name, pool in self.pools.items():
            pool.validate(name)
        return self


def parse_pool_option(text: str) -> tuple[str, PoolConfig]:
    """``NAME=MIN`` or ``NAME=MIN:MAX`` (the ``--pool`` option)."""
    name, sep, sizes = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--pool wants NAME=MIN or NAME=MIN:MAX (got {text!r})")
    lo, _, hi = sizes.partition(":")
    try:
        pool = PoolConfig(min_ready=int(lo), max_total=int(hi) if hi else 0)
    except ValueError:
        raise ConfigError(f"--pool wants NAME=MIN or NAME=MIN:MAX (got {text!r})") from None
    pool.validate(name)
    return name, pool


def _pool_from_toml(name: str, value: Any) -> PoolConfig:
    if type(value) is int:
        return PoolConfig(min_ready=value)
    if isinstance(value, dict):
        unknown = set(value) - {"min_ready", "max_total"}
        if unknown or not all(type(v) is int for v in value.values()):
            raise ConfigError(f"[pools] {name}: want min_ready / max_total integers")
        return PoolConfig(**value)
    raise ConfigError(f"[pools] {name}: want an integer or {{min_ready, max_total}}")


_SCALARS = {
    "host": str,
    "port": int,
    "backend": str,
    "default_timeout": (int, float),
    "max_timeout": (int, float),
    "default_template": str,
    "default_max_total": int,
    "wait_for_pools": bool,
    "heartbeat": (int, float),
    "max_streams_per_session": int,
    "log_level": str,
    "audit_log": str,
}
_PATHS = ("state_dir", "templates_dir")


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> GatewayConfig:
    """Defaults, then the TOML file, then the environment."""
    env = os.environ if env is None else env
    cfg = GatewayConfig()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        apply_toml(cfg, data, str(path))
    try:
        cfg.keys.add_env(env.get(ENV_VAR))
    except AuthConfigError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def apply_toml(cfg: GatewayConfig, data: dict, source: str = "config") -> None:
    known = set(_SCALARS) | set(_PATHS) | {"pools", "limits", "api_keys", "api_keys_file"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
    for key, types in _SCALARS.items():
        if key in data:
            value = data[key]
            if not isinstance(value, types) or (types is int and type(value) is bool):
                raise ConfigError(f"{source}: {key} has the wrong type")
            setattr(cfg, key, float(value) if types == (int, float) else value)
    for key in _PATHS:
        if key in data:
            if not isinstance(data[key], str):
                raise ConfigError(f"{source}: {key} must be a path string")
            setattr(cfg, key, Path(data[key]))
    if "pools" in data:
        if not isinstance(data["pools"], dict):
            raise ConfigError(f"{source}: [pools] must be a table")
        cfg.pools = {name: _pool_from_toml(name, v) for name, v in data["pools"].items()}
    if "limits" in data:
        lim = data["limits"]
        names = {f.name for f in fields(Limits)}
        if not isinstance(lim, dict) or set(lim) - names:
            raise ConfigError(f"{source}: [limits] takes {', '.join(sorted(names))}")
        try:
            cfg.limits = Limits(**{**cfg.limits.__dict__, **lim})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: [limits]: {exc}") from None
    try:
        if "api_keys_file" in data:
            cfg.keys.add_file(data["api_keys_file"])
        if "api_keys" in data:
            if not isinstance(data["api_keys"], list) or not all(
                isinstance(k, str) for k in data["api_keys"]
            ):
                raise ConfigError(f"{source}: api_keys must be a list of strings")
            cfg.keys.add_entries(data["api_keys"], f"{source}: api_keys")
    except AuthConfigError as exc:
        raise ConfigError(str(exc)) from None
