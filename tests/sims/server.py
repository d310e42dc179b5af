"""The part every simulator shares: its aiohttp app served on a loopback port, and stopped."""

from __future__ import annotations

import ssl

from aiohttp import web


class LoopbackServer:
    """Base of the simulators. Subclasses build their app and call `_serve(app)` from `start()`."""

    port: int = 0
    scheme: str = "http"
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def _serve(self, app: web.Application, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        # A short shutdown timeout: a stalled handler (a commanded failure) must not hold up teardown.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=tls)
        self.scheme = "https" if tls is not None else "http"
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Stop listening: new connections are refused."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
