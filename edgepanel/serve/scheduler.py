"""One request queue per model, and the thread that decodes it.

The C engine has one thread pool per process, so one thread drives the model: it takes up to
`slots` requests from a FIFO queue and advances them together, one batched forward pass per
step (a new request's prompt and the others' last tokens in the same pass).  Each request owns
its sampler, its stop-string cutter and its slot of the KV cache, so its tokens are exactly
those `Model.generate` gives it alone with the same seed.  A request whose client went away is
dropped before the next step; finished ones leave their slot at once and the next in the queue
takes it.

Other work on the model (best_of's scoring of its candidates: forward passes, and the reference's
parameters swapped in and out in place) is a `Call`, run by the same thread between two steps, so
no forward pass of another request ever overlaps it or sees the swapped parameters.

Events go back to the request's handler through `emit` (thread-safe, e.g. an asyncio loop's
call_soon_threadsafe): ("delta", index, text, logprob entries), ("end", index, finish_reason,
completion tokens), ("error", index, message, HTTP status); a Call's ("result", value) or
("error", -1, message, HTTP status)."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from ..model.generate import Decoding, SlotCache, StopCutter, forward_slots
from ..sample import Sampling

log = logging.getLogger("edgepanel.serve")


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class Job:
    """One sequence of one request (a request with n choices makes n jobs)."""

    def __init__(self, model, ids: list[int], params: Sampling, emit: Callable, index: int = 0,
                 ctx: int | None = None, logit_bias: dict | None = None, logprobs: int | None = None):
        self.ids, self.index, self.emit, self.logprobs = ids, index, emit, logprobs
        self.tokenizer = model.tokenizer
        self.decoding = Decoding(ids, params, model.tokenizer.eos_ids, ctx or model.cfg.max_seq_len,
                                 logit_bias, model.cfg.vocab_size)
        self.cutter = StopCutter(model.tokenizer, params.stop)
        self.next_input = np.asarray(ids, np.int32)   # what the next forward pass feeds this sequence
        self.pending_lp: list = []                    # logprob entries not yet sent with a text piece
        self.cancelled = False
        self.finish_reason: str | None = None
        self.t_submit = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _send(self, *event):
        try:
            self.emit(event)
        except RuntimeError:          # the handler's event loop is gone (shutdown): nobody listens
            self.cancelled = True

    def _logprob_entry(self, logits: np.ndarray, tok: int):
        """(token text, log p, top alternatives) under the model's own distribution (the logits
        before penalties, temperature and bias)."""
        x = logits.astype(np.float64)
        m = x.max()
        lse = m + np.log(np.exp(x - m).sum())
        text = lambda t: self.tokenizer.decode([int(t)], skip_special_tokens=False)  # noqa: E731
        top = []
        if self.logprobs:
            idx = np.argpartition(-x, self.logprobs - 1)[:self.logprobs]
            idx = idx[np.argsort(-x[idx], kind="stable")]
            top = [(text(i), float(x[i] - lse)) for i in idx]
        return text(tok), float(x[tok] - lse), top

    def advance(self, logits: np.ndarray):
        """Sample the next token from this sequence's logits, hand its text on, and finish if due."""
        now = time.monotonic()
        tok = self.decoding.step(logits)
        piece = ""
        if tok is not None:
            if self.logprobs is not None:
                self.pending_lp.append(self._logprob_entry(logits, tok))
            self.t_first = self.t_first or now
            self.t_last = now
            piece = self.cutter.push(tok)
            self.next_input = np.array([tok], np.int32)
        if self.cutter.stopped:
            self.finish_reason = "stop"
        elif self.decoding.finish_reason:
            self.finish_reason = self.decoding.finish_reason
            piece += self.cutter.flush()
        if piece or (self.pending_lp and self.done):
            self._send("delta", self.index, piece, self.pending_lp)
            self.pending_lp = []
        if self.done:
            self._send("end", self.index, self.finish_reason, self.decoding.generated)

    def fail(self, message: str, status: int = 500):
        self.finish_reason = "error"
        self._send("error", self.index, message, status)


class Call:
    """A function to run on the decoding thread between two steps; its value (or its failure) is
    emitted.  Cancelled before it starts, it does not run."""

    def __init__(self, fn: Callable, emit: Callable, what: str = "work"):
        self.fn, self.emit, self.what = fn, emit, what
        self.cancelled = False

    def _send(self, *event):
        try:
            self.emit(event)
        except RuntimeError:          # the handler's event loop is gone (shutdown)
            self.cancelled = True

    def run(self):
        if self.cancelled:
            return
        try:
            value = self.fn()
        except Exception as exc:      # reported to its request, never the end of the thread
            log.exception("%s failed", self.what)
            self._send("error", -1, f"{self.what} failed: {exc}", 500)
            return
        self._send("result", value)

    def fail(self, message: str, status: int = 500):
        self._send("error", -1, message, status)


class Scheduler:
    """The queue and the decoding thread of one model.  `on_done(job)` is called (on the thread)
    for every job that leaves, finished, cancelled or failed."""

    def __init__(self, model, slots: int, ctx: int, max_queue: int, on_done: Callable = lambda job: None):
        self.model, self.slots, self.ctx, self.max_queue, self.on_done = model, slots, ctx, max_queue, on_done
        self.cache = SlotCache(model.cfg, slots, ctx, model.engine.kv_dtype)
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []          # running[s] lives in cache slot s
        self.calls: deque[Call] = deque()     # run before the next step
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="edgepanel-decode", daemon=True)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running_count(self) -> int:
        return len(self.running)

    def start(self):
        self.thread.start()

    def stop(self, timeout: float = 5.0):
        """Stop decoding: jobs still queued or running end with an error event (503).  Idempotent."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def submit(self, jobs: list[Job]):
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_queue + self.slots - len(self.running):
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.max_queue})")
            self.waiting.extend(jobs)
            self.cond.notify_all()

    def call(self, c: Call):
        """Run `c` on the decoding thread before its next step (a request's own work: not
        counted against the queue)."""
        with self.cond:
            if self.stopping:
                c.fail("the server is shutting down", 503)
                return
            self.calls.append(c)
            self.cond.notify_all()

    def cancel(self, job: Job):
        """The client went away: drop the job now if it waits, before the next step if it runs."""
        job.cancelled = True
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                job.finish_reason = "cancelled"
                self.on_done(job)

    # -- the decoding thread ------------------------------------------------------------------
    def _take(self) -> list[Job]:
        """Under the lock: the jobs that get the free slots (FIFO); waits while there is nothing to do."""
        while not self.waiting and not self.running and not self.calls and not self.stopping:
            self.cond.wait()
        taken = []
        while self.waiting and len(self.running) + len(taken) < self.slots:
            taken.append(self.waiting.popleft())
        return taken

    def _start(self, job: Job):
        """Give `job` the next slot (the cache grown to its length if need be)."""
        if job.decoding.finish_reason:         # max_tokens 0: nothing to compute
            job.finish_reason = job.decoding.finish_reason
            job._send("end", job.index, job.finish_reason, 0)
            self.on_done(job)
            return
        try:
            self.cache.reserve(job.decoding.capacity)
        except MemoryError:
            job.fail(f"not enough memory for a cache of {job.decoding.capacity} positions (lower --ctx or "
                     "--parallel)", 503)
            self.on_done(job)
            return
        self.cache.lengths[len(self.running)] = 0
        self.running.append(job)

    def _release_done(self):
        """Free the slots of finished or cancelled jobs, keeping live ones in slots 0..m-1."""
        for s in reversed(range(len(self.running))):
            job = self.running[s]
            if job.cancelled and not job.done:
                job.finish_reason = "cancelled"
            if not job.done:
                continue
            last = len(self.running) - 1
            if s != last:
                self.cache.move(last, s)
                self.running[s] = self.running[last]
            self.cache.lengths[last] = 0
            self.running.pop()
            self.on_done(job)

    def _step(self):
        """One batched forward pass over the running jobs, and a token for each."""
        self._release_done()                   # cancelled ones leave before any more work
        if not self.running:
            return
        logits = forward_slots(self.model.engine, self.cache, [j.next_input for j in self.running])
        for s, job in enumerate(self.running):
            try:
                job.advance(logits[s])
            except Exception as exc:           # e.g. non-finite logits from broken parameters
                log.exception("sampling failed")
                job.fail(f"sampling failed: {exc}")
        self._release_done()

    def _loop(self):
        while True:
            with self.cond:
                taken = self._take()
                calls, self.calls = self.calls, deque()
                if self.stopping:
                    self.waiting.extendleft(reversed(taken))
                    self.calls.extendleft(reversed(calls))
                    break
            for c in calls:
                c.run()
            try:
                for job in taken:
                    self._start(job)
                self._step()
            except Exception as exc:           # nothing a client sends should get here; never die silently
                log.exception("decoding failed")
                for job in taken:                  # taken, but never given a slot
                    if job not in self.running and not job.done:
                        job.fail(f"decoding failed: {exc}")
                        self.on_done(job)
                for job in self.running:
                    if not job.done:
                        job.fail(f"decoding failed: {exc}")
                self._release_done()
        with self.cond:
            left = list(self.waiting) + self.running
            calls = list(self.calls)
            self.waiting.clear()
            self.calls.clear()
            self.running = []
        for job in left:
            job.fail("the server is shutting down", 503)
            self.on_done(job)
        for c in calls:
            c.fail("the server is shutting down", 503)
