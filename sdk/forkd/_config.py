"""Where the gateway is, which key to use, and how long to wait.

E2B programs pass E2B's connection options (``api_key``, ``request_timeout``,
``domain``, ``debug``, ...) to almost every call. They are all accepted here, so
changing the import line is the only change such a program needs; the ones that
mean nothing to forkd (``proxy``, ``headers``...) are kept but unused. ``domain``
is where ``get_host`` points (see ``sandbox_domain``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ._transports import Transport

__all__ = [
    "ApiParams",
    "ConnectionConfig",
    "TransportFactory",
    "DEFAULT_URL",
    "REQUEST_TIMEOUT",
    "Username",
    "default_username",
]

DEFAULT_URL = "http://127.0.0.1:49982"
REQUEST_TIMEOUT = 60.0
HEARTBEAT_INTERVAL = 10.0
HEARTBEAT_TIMEOUT = 20.0

Username = str
default_username: Username = "user"

TransportFactory = Callable[[], Awaitable["Transport"]]
"""``async () -> Transport``: opens one connection to a gateway (tests pass an in-memory one)."""


class ApiParams(TypedDict, total=False):
    """Connection options every lifecycle call accepts (E2B's names plus forkd's)."""

    api_key: str | None
    request_timeout: float | None
    url: str | None
    transport_factory: TransportFactory | None
    heartbeat_interval: float | None
    heartbeat_timeout: float | None
    # E2B's options: accepted so E2B programs run unchanged, not used by forkd.
    domain: str | None
    debug: bool | None
    api_url: str | None
    sandbox_url: str | None
    headers: dict[str, str] | None
    api_headers: dict[str, str] | None
    proxy: Any
    retries: int | None
    http_version: str | None
    validate_api_key: bool | None
    logger: Any


_OWN = (
    "url", "api_key", "request_timeout", "transport_factory", "heartbeat_interval", "heartbeat_timeout", "domain",
)  # fmt: skip


class ConnectionConfig:
    """Resolved connection settings: explicit arguments, then the environment, then defaults.

    - ``url``: ``FORKD_URL``, default ``http://127.0.0.1:49982`` (http(s) and ws(s) both work).
    - ``api_key``: ``FORKD_API_KEY``, else ``E2B_API_KEY``; None means no key (a loopback gateway).
    - ``request_timeout``: seconds a plain request may take, default 60; ``0`` means no limit.
    - ``transport_factory``: ``async () -> Transport`` used instead of a websocket
      (in-process gateways, tests). Connections are shared per factory.
    - ``heartbeat_interval`` / ``heartbeat_timeout``: ping after this much silence
      (default 10 s); the connection is dead after ``heartbeat_timeout`` (20 s) without a frame.
    - ``domain``: ``FORKD_DOMAIN``, else the gateway's ``host:port`` (``localhost:<port>`` for a
      loopback gateway); ``get_host(port)`` is ``{port}-{sandbox_id}.{domain}``.
    """

    envd_port = 49983  # E2B's class attribute; some programs read it

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        request_timeout: float | None = None,
        transport_factory: TransportFactory | None = None,
        heartbeat_interval: float | None = None,
        heartbeat_timeout: float | None = None,
        *,
        domain: str | None = None,
        debug: bool | None = None,
        api_url: str | None = None,
        sandbox_url: str | None = None,
        headers: dict[str, str] | None = None,
        api_headers: dict[str, str] | None = None,
        proxy: Any = None,
        retries: int | None = None,
        http_version: str | None = None,
        validate_api_key: bool | None = None,
        logger: Any = None,
        extra_sandbox_headers: dict[str, str] | None = None,
    ) -> None:
        self.url = (url or os.environ.get("FORKD_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("FORKD_API_KEY") or os.environ.get("E2B_API_KEY") or None
        self.request_timeout = _timeout(REQUEST_TIMEOUT, request_timeout)
        self.transport_factory = transport_factory
        self.heartbeat_interval = heartbeat_interval or HEARTBEAT_INTERVAL
        self.heartbeat_timeout = heartbeat_timeout or HEARTBEAT_TIMEOUT
        self._domain = domain or os.environ.get("FORKD_DOMAIN") or None
        self.domain = self._domain or sandbox_domain(self.url)
        self.debug = bool(debug)
        self.api_url = api_url
        self.sandbox_url = sandbox_url
        self.headers = {**(headers or {}), **(api_headers or {})}
        self.proxy = proxy
        self.retries = retries
        self.http_version = http_version
        self.logger = logger

    def get_request_timeout(self, request_timeout: float | None = None) -> float | None:
        """The timeout of one call: its own ``request_timeout`` if given (0 = none), else the config's."""
        return _timeout(self.request_timeout, request_timeout)

    def get_api_params(self, **opts: Any) -> dict[str, Any]:
        """This config's own settings overridden by the call's ``opts`` (None values do not override)."""
        params: dict[str, Any] = {
            "url": self.url,
            "api_key": self.api_key,
            "request_timeout": self.request_timeout if self.request_timeout is not None else 0,
            "transport_factory": self.transport_factory,
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
            "domain": self._domain,
        }
        params.update({k: v for k, v in opts.items() if v is not None})
        return params

    def with_options(self, **opts: Any) -> ConnectionConfig:
        """A copy with ``opts`` applied; itself when nothing that matters changes."""
        if not any(opts.get(k) is not None for k in _OWN):
            return self
        return ConnectionConfig(**{k: v for k, v in self.get_api_params(**opts).items() if k in _OWN})

    @property
    def connection_key(self) -> tuple:
        """Calls with the same key share one connection (per event loop)."""
        return (self.transport_factory or self.url, self.api_key)

    def get_host(self, sandbox_id: str, port: int) -> str:
        """E2B's ``{port}-{sandbox_id}.{domain}``: the gateway proxies requests with that Host to ``port``."""
        return f"{port}-{sandbox_id}.{self.domain}"

    def __repr__(self) -> str:
        key = "set" if self.api_key else "none"
        return f"ConnectionConfig(url={self.url!r}, api_key=<{key}>, request_timeout={self.request_timeout})"


def config_from(**opts: Any) -> ConnectionConfig:
    """A ConnectionConfig from a call's options (unknown E2B options are ignored)."""
    known = {k: v for k, v in opts.items() if k in _OWN}
    return ConnectionConfig(**known)


def _timeout(default: float | None, value: float | None) -> float | None:
    if value == 0:
        return None
    if value is not None:
        return float(value)
    return default


def sandbox_domain(url: str) -> str:
    """The domain of sandbox hosts for a gateway at ``url``: its ``host:port``, except that a loopback
    gateway is ``localhost:<port>``, because ``*.localhost`` resolves to loopback in curl and browsers
    (not in glibc: a Python client connects to the gateway and sends the host as its Host header)."""
    parts = urlsplit(_as_http(url))
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return parts.netloc.rpartition("@")[2]
    return f"localhost:{port}" if port else "localhost"


def _as_http(url: str) -> str:
    if url.startswith(("http://", "https://", "ws://", "wss://")):
        return url
    return "http://" + url
