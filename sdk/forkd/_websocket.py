"""Protocol frames over a websocket (the SDK ⇄ gateway carrier).

Each websocket message is one frame body. ``websockets`` is imported inside
``connect()`` so that importing the SDK stays cheap and the guest agent (which
shares this package) never needs it.
"""

from __future__ import annotations

from ._transports import TransportClosed
from .protocol import MAX_FRAME_SIZE, SUBPROTOCOL, ProtocolError

__all__ = ["WebSocketTransport", "ws_url"]


def ws_url(url: str, path: str = "/v1/ws") -> str:
    """http(s)://host:port → ws(s)://host:port/v1/ws; ws(s) URLs pass through."""
    url = url.rstrip("/")
    if url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    elif url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    return url if url.endswith(path) else url + path


class WebSocketTransport:
    def __init__(self, ws) -> None:
        self._ws = ws

    @classmethod
    async def connect(
        cls,
        url: str,
        api_key: str | None = None,
        open_timeout: float | None = 10,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> WebSocketTransport:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            ws = await connect(
                ws_url(url),
                subprotocols=[SUBPROTOCOL],
                additional_headers=headers,
                max_size=max_frame_size,
                compression=None,  # payloads are mostly binary output; compressing costs more than it saves
                open_timeout=open_timeout,
                ping_interval=None,  # heartbeats are the protocol's own (ping requests)
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                from ._exceptions import AuthenticationException

                raise AuthenticationException(f"the gateway refused the API key (HTTP {status})") from None
            raise TransportClosed(f"websocket handshake failed: HTTP {status}") from None
        except (OSError, TimeoutError) as exc:
            raise TransportClosed(f"cannot connect to {url}: {exc}") from None
        return cls(ws)

    async def send(self, body: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._ws.send(body)
        except ConnectionClosed as exc:
            raise TransportClosed(str(exc)) from None

    async def recv(self) -> bytes:
        from websockets.exceptions import ConnectionClosed

        try:
            msg = await self._ws.recv()
        except ConnectionClosed as exc:
            raise TransportClosed(str(exc)) from None
        if isinstance(msg, str):
            raise ProtocolError("text websocket message: frames are binary")
        return msg

    async def close(self) -> None:
        await self._ws.close()
