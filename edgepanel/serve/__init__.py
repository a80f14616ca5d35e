"""`edgepanel serve`: an OpenAI-compatible HTTP server over one model, on Starlette and uvicorn
(pip install 'edgepanel[serve]'; imported only when serving).

    from edgepanel.serve import ServeOptions, create_app, run
    run(edgepanel.load("model.ep"), ServeOptions(port=8080, api_key="..."))

`options` the defaults (ServeOptions), `schemas` the wire format and its checks, `scheduler` the
request queue and the decoding thread, `metrics` Prometheus counters, `app` the routes, `server`
the socket, uvicorn and shutdown."""
from .options import InsecureBind, ServeOptions


def create_app(model, opts: ServeOptions | None = None):
    """The ASGI app serving `model` (its decoding thread starts with the app's lifespan)."""
    from .server import require_stack
    require_stack()
    from .app import create_app as make
    return make(model, opts or ServeOptions())


def run(model, opts: ServeOptions | None = None, log=print, verbose: bool = False) -> int:
    from .server import run as serve
    return serve(model, opts or ServeOptions(), log, verbose)


__all__ = ["InsecureBind", "ServeOptions", "create_app", "run"]
