"""Running the app: bind the socket, serve with uvicorn until SIGTERM or SIGINT, shut down cleanly.

On SIGTERM uvicorn stops accepting connections and waits for the requests in flight.  Those
still running (or queued) shutdown_timeout seconds later are cut by stopping the decoding
thread: each ends with a 503 "the server is shutting down" (an error event in a stream, which
the openai client raises), not a dropped connection.  uvicorn's own cancellation stays behind
that, a few seconds later, as a backstop."""
from __future__ import annotations

import asyncio
import signal
import socket

from ..errors import EdgepanelError
from .options import ServeOptions


def require_stack():
    """starlette and uvicorn, or a clear error saying how to get them."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise EdgepanelError(f"edgepanel serve needs starlette and uvicorn ({exc}): "
                             "pip install 'edgepanel[serve]'") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)       # connections wait in the backlog until uvicorn accepts them
    except OSError as exc:
        sock.close()
        raise EdgepanelError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock


def run(model, opts: ServeOptions, log=print, verbose: bool = False) -> int:
    """Serve `model` until SIGTERM or SIGINT; returns 0 after a clean shutdown."""
    require_stack()
    import uvicorn

    from .app import create_app
    app = create_app(model, opts)
    server_state = app.state.server
    sock = bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {server_state.model_id} at http://{shown}:{port}/v1 (context {server_state.ctx}, "
        f"{opts.parallel} at a time, queue {opts.max_queue}, "
        f"{'API key required' if opts.api_key else 'no API key'}{', /metrics' if opts.metrics else ''})")
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose, lifespan="on",
                            timeout_graceful_shutdown=opts.shutdown_timeout + 5, server_header=False)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            loop = asyncio.get_running_loop()
            cut = loop.call_later(opts.shutdown_timeout, lambda: loop.run_in_executor(None, server_state.scheduler.stop))
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()

    # uvicorn re-raises the signal that stopped it once it has shut down; this handler makes that
    # a clean exit (status 0) instead of death by signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    log("stopped")
    return 0
