"""The ASGI app (Starlette): OpenAI's endpoints over one model.

    POST /v1/chat/completions   POST /v1/completions   (streamed as server-sent events, or whole)
    GET  /v1/models             GET  /health            GET /metrics (with --metrics)

Every endpoint but /health wants the API key when one is set.  A request is checked
(schemas.py), its prompt (messages, text, ids or a panel) rendered and tokenized off the event
loop, and its choices queued as jobs for the model's one decoding thread (scheduler.py), whose
events come back through an asyncio queue per request.  With best_of, the candidates are jobs
too, and their scoring a scheduler.Call on the same thread."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import replace

from ..errors import EdgepanelError
from ..panels.schema import Panel, PanelError
from ..sample import Sampling
from ..tune import reward
from . import schemas
from .metrics import Metrics
from .options import ServeOptions
from .scheduler import Call, Job, QueueFull, Scheduler
from .schemas import ApiError

log = logging.getLogger("edgepanel.serve")
FINGERPRINT = "edgepanel"


class Server:
    """The state behind the routes: the model, its scheduler, the metrics."""

    def __init__(self, model, opts: ServeOptions):
        self.model, self.opts = model, opts
        self.ctx = min(opts.ctx or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.vocab = model.cfg.vocab_size
        self.model_id = opts.model_id or model.path.stem
        self.key_digest = None if opts.api_key is None else hashlib.sha256(opts.api_key.encode()).digest()
        self.metrics = Metrics()
        self.beta = reward.default_beta(model)   # best_of's: the preference run's recorded in the file
        self.scheduler = Scheduler(model, opts.parallel, self.ctx, opts.max_queue, self.metrics.job_done)

    # -- request plumbing ---------------------------------------------------------------------
    def check_key(self, request):
        """401 unless the request carries the key.  Both sides are hashed first, so the constant-
        time comparison does not even reveal the key's length."""
        if self.key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.key_digest):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    async def read_body(self, request) -> bytes:
        """The body, refused with 413 past max_body (by its Content-Length, or while it streams in)."""
        cap = self.opts.max_body
        too_big = ApiError(413, f"the request body is larger than {cap} bytes (--max-body)", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise too_big
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > cap:
                raise too_big
        return bytes(buf)

    def prompt(self, req: schemas.GenRequest) -> tuple[list[int], str]:
        """(prompt token ids, the prompt's text for echo), on a worker thread: chat templates render
        in the tokenizer's sandbox (a template cannot reach Python objects)."""
        if req.panel is not None:
            return self.panel_prompt(req)
        param = "messages" if req.kind == "chat" else "prompt"
        try:
            if req.kind == "completion" and not isinstance(req.prompt, str):
                ids = list(req.prompt)
                text = self.model.tokenizer.decode(ids) if req.echo else ""
            else:
                ids = self.model.prompt_ids(req.prompt)
                text = req.prompt if req.echo else ""
        except (EdgepanelError, ValueError, TypeError) as exc:
            raise ApiError(400, str(exc), param=param) from None
        if len(ids) >= self.ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; the context holds {self.ctx} (prompt and "
                           "completion together): shorten it", param=param, code="context_length_exceeded")
        return ids, text

    def panel_prompt(self, req: schemas.GenRequest) -> tuple[list[int], str]:
        """A panel request's prompt, rendered as edgepanel.best_of renders a panel (reward.prepare):
        shortened to leave max_tokens of the context (left out: Sampling's default, at most half
        the context); chat: in the model's chat template when it has one, completions: plain text,
        whose paragraph ends at a blank line unless the request gives stop strings (they go into
        req.sampling)."""
        try:
            panel = Panel.from_dict(req.panel, "panel")
        except PanelError as exc:      # "panel: characters[0].name: ..." -> param panel.characters[0].name
            param = "panel." + exc.field_path if exc.field_path else "panel"
            message = str(exc).replace("panel: ", "panel.", 1) if exc.field_path else str(exc)
            raise ApiError(400, message, param=param) from None
        max_tokens = req.sampling.get("max_tokens", min(Sampling.default("max_tokens"), self.ctx // 2))
        try:
            ids, stop = reward.prepare(self.model, panel, max_tokens, None if req.kind == "chat" else False, self.ctx)
        except PanelError as exc:      # too long with every field dropped
            raise ApiError(400, f"panel does not fit beside max_tokens {max_tokens} in the context of {self.ctx} "
                           f"tokens: {exc}", param="panel", code="context_length_exceeded") from None
        except (EdgepanelError, ValueError, TypeError) as exc:
            raise ApiError(400, f"panel: {exc}", param="panel") from None
        if stop and "stop" not in req.sampling:
            req.sampling["stop"] = stop
        return ids, self.model.tokenizer.decode(ids) if req.echo else ""

    def sampling(self, req: schemas.GenRequest, n_prompt: int) -> Sampling:
        try:
            params = Sampling(**req.sampling)
        except ValueError as exc:
            raise ApiError(400, str(exc), param=str(exc).split()[0]) from None
        room = self.ctx - n_prompt
        if req.max_tokens_given and params.max_tokens > room:
            raise ApiError(400, f"max_tokens {params.max_tokens} does not fit: the prompt is {n_prompt} tokens and "
                           f"the context holds {self.ctx} ({room} left)", param="max_tokens",
                           code="context_length_exceeded")
        return replace(params, max_tokens=min(params.max_tokens, room))

    # -- endpoints ----------------------------------------------------------------------------
    async def generate(self, request, kind: str):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, StreamingResponse
        try:
            self.check_key(request)
            body = schemas.parse_json(await self.read_body(request))
            parse = schemas.parse_chat if kind == "chat" else schemas.parse_completion
            req = parse(body, self.vocab, self.ctx)
            ids, echo = await run_in_threadpool(self.prompt, req)
            params = self.sampling(req, len(ids))
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
            if req.best_of > 1:        # the candidates' seeds as edgepanel.best_of derives them
                seeds = reward.candidate_seeds(params.seed, req.best_of)
            else:
                seeds = [None if params.seed is None else params.seed + i for i in range(req.n)]
            jobs = [Job(self.model, ids, replace(params, seed=s), emit, i, self.ctx, req.logit_bias, req.logprobs)
                    for i, s in enumerate(seeds)]
            try:
                self.scheduler.submit(jobs)
            except QueueFull as exc:
                raise ApiError(503, f"busy: {exc}; try again", type="server_error", code="overloaded") from None
        except ApiError as exc:
            self.metrics.request(kind, exc.status)
            return JSONResponse(exc.body(), status_code=exc.status)
        reply = Reply(self, req, jobs, events, ids, echo, emit, seeds)
        if req.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(request)

    async def models(self, request):
        from starlette.responses import JSONResponse
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse
        self.check_key(request)
        if request.path_params["model_id"] != self.model_id:
            raise ApiError(404, f"no model {request.path_params['model_id']!r} here (this server has {self.model_id!r})",
                           param="model", code="model_not_found")
        return JSONResponse(self.model_card())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": int(self.model.path.stat().st_mtime),
                "owned_by": "edgepanel", "context_length": self.ctx}

    async def health(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request):
        from starlette.responses import PlainTextResponse
        self.check_key(request)
        s = self.scheduler
        return PlainTextResponse(self.metrics.render(s.queue_length, s.running_count, s.slots),
                                 media_type="text/plain; version=0.0.4")


class Reply:
    """The response to one generation request, whole or as a stream of chunks."""

    def __init__(self, server: Server, req: schemas.GenRequest, jobs: list[Job], events: asyncio.Queue,
                 ids: list[int], echo: str, emit, seeds: list):
        self.server, self.req, self.jobs, self.events = server, req, jobs, events
        self.ids, self.prompt_tokens, self.echo, self.emit, self.seeds = ids, len(ids), echo, emit, seeds
        self.call: Call | None = None           # best_of's scoring, once every candidate is written
        self.chat = req.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.server.model_id,
                "system_fingerprint": FINGERPRINT}

    def logprobs(self, entries, offset: int):
        if self.req.logprobs is None:
            return None
        return schemas.chat_logprobs(entries) if self.chat else schemas.completion_logprobs(entries, offset)

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, logprobs=None,
              role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            body = dict(self.head("chat.completion.chunk"), choices=[choice])
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            body = dict(self.head("text_completion"), choices=[choice])
        if self.req.include_usage:
            body["usage"] = None
        return schemas.sse(body)

    def cancel_jobs(self):
        for job in self.jobs:
            if not job.done:
                self.server.scheduler.cancel(job)
        if self.call is not None:
            self.call.cancelled = True

    async def stream(self):
        n, status, completion = self.req.n, 499, 0   # 499: the client left before the end
        offsets = [len(self.echo)] * n
        try:
            for i in range(n):
                if self.chat:
                    yield self.chunk(i, role=True)
                elif self.echo:
                    yield self.chunk(i, self.echo)
            left = n
            while left:
                ev = await self.events.get()
                if ev[0] == "delta":
                    _, i, text, entries = ev
                    yield self.chunk(i, text, logprobs=self.logprobs(entries, offsets[i]))
                    offsets[i] += len(text)
                elif ev[0] == "end":
                    _, i, finish, tokens = ev
                    completion += tokens
                    left -= 1
                    yield self.chunk(i, None if self.chat else "", finish=finish)
                else:
                    status = ev[3]
                    yield schemas.sse(ApiError(ev[3], ev[2], type="server_error").body())
                    return
            if self.req.include_usage:
                yield schemas.sse(dict(self.head("chat.completion.chunk" if self.chat else "text_completion"),
                                       choices=[], usage=schemas.usage(self.prompt_tokens, completion)))
            yield "data: [DONE]\n\n"
            status = 200
        finally:
            self.cancel_jobs()
            self.server.metrics.request(self.req.kind, status, self.prompt_tokens)

    async def collect(self):
        """(every job's (text, finish_reason, tokens, logprob entries), best_of's reward.BestOf or
        None), or the ApiError to answer."""
        n = len(self.jobs)
        texts, entries = [[] for _ in range(n)], [[] for _ in range(n)]
        finish, tokens = [None] * n, [0] * n
        left = n
        while left:
            ev = await self.events.get()
            if ev[0] == "delta":
                texts[ev[1]].append(ev[2])
                entries[ev[1]] += ev[3]
            elif ev[0] == "end":
                finish[ev[1]], tokens[ev[1]] = ev[2], ev[3]
                left -= 1
            else:
                return ApiError(ev[3], ev[2], type="server_error")
        results = [("".join(t), f, k, e) for t, f, k, e in zip(texts, finish, tokens, entries)]
        if self.req.best_of == 1:
            return results, None
        model, ids, seeds, cands = self.server.model, self.ids, self.seeds, [r[0] for r in results]
        self.call = Call(lambda: reward.rank(model, ids, cands, seeds, self.server.beta), self.emit,
                         "scoring best_of's candidates")
        self.server.scheduler.call(self.call)
        ev = await self.events.get()
        if ev[0] == "error":
            return ApiError(ev[3], ev[2], type="server_error")
        return results, ev[1]

    async def whole(self, request):
        from starlette.responses import JSONResponse, Response
        collector = asyncio.ensure_future(self.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collector, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collector.done():
                collector.cancel()
            self.cancel_jobs()
        if not collector.done() or collector.cancelled():
            self.server.metrics.request(self.req.kind, 499, self.prompt_tokens)
            return Response(status_code=499)     # nobody is listening
        result = collector.result()
        if isinstance(result, ApiError):
            self.server.metrics.request(self.req.kind, result.status, self.prompt_tokens)
            return JSONResponse(result.body(), status_code=result.status)
        result, best = result
        choices = []
        for i, (text, finish, _, entries) in enumerate(result if best is None else [result[best.index]]):
            lp = self.logprobs(entries, len(self.echo))
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": self.echo + text},
                                "logprobs": lp, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": self.echo + text, "logprobs": lp, "finish_reason": finish})
        body = dict(self.head("chat.completion" if self.chat else "text_completion"), choices=choices,
                    usage=schemas.usage(self.prompt_tokens, sum(r[2] for r in result)))
        if best is not None:
            body["best_of"] = schemas.best_of(best, self.server.beta, [r[1] for r in result])
        self.server.metrics.request(self.req.kind, 200, self.prompt_tokens)
        return JSONResponse(body)


async def _disconnected(request):
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(model, opts: ServeOptions):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    server = Server(model, opts)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.scheduler.stop)

    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     code=kind).body(), status_code=exc.status_code)

    async def internal_error(request, exc: Exception):
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), status_code=500)

    async def chat(request):
        return await server.generate(request, "chat")

    async def completions(request):
        return await server.generate(request, "completion")

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", server.model, methods=["GET"]),
              Route("/health", server.health, methods=["GET"])]
    if opts.metrics:
        routes.append(Route("/metrics", server.prometheus, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    return app
