"""Counters for GET /metrics, in Prometheus' text format (written here: a few lines, no client
library): requests by endpoint and status, prompt and completion tokens, time to first token
and time per output token (histograms), queue length and running requests (gauges)."""
from __future__ import annotations

import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)   # cumulative, as Prometheus wants them
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float):
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def request(self, endpoint: str, status: int, prompt_tokens: int = 0):
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.prompt_tokens += prompt_tokens

    def job_done(self, job):
        """A sequence left the scheduler (its Job: tokens made, times, why it ended)."""
        with self.lock:
            self.completion_tokens += job.decoding.generated
            self.cancelled += job.finish_reason == "cancelled"
            if job.t_first is not None:
                self.ttft.observe(job.t_first - job.t_submit)
                if job.decoding.generated > 1:
                    self.tpot.observe((job.t_last - job.t_first) / (job.decoding.generated - 1))

    def render(self, queue_length: int, running: int, slots: int) -> str:
        with self.lock:
            lines = ["# HELP edgepanel_requests_total HTTP requests answered, by endpoint and status",
                     "# TYPE edgepanel_requests_total counter"]
            lines += [f'edgepanel_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            for name, help_, kind, value in [
                ("prompt_tokens_total", "prompt tokens of accepted requests", "counter", self.prompt_tokens),
                ("completion_tokens_total", "tokens generated", "counter", self.completion_tokens),
                ("cancelled_total", "sequences dropped because their client went away", "counter", self.cancelled),
                ("queue_length", "requests waiting for a slot", "gauge", queue_length),
                ("running", "sequences being decoded", "gauge", running),
                ("slots", "sequences decoded together at most (--parallel)", "gauge", slots)]:
                lines += [f"# HELP edgepanel_{name} {help_}", f"# TYPE edgepanel_{name} {kind}",
                          f"edgepanel_{name} {value}"]
            for name, help_, h in [
                    ("time_to_first_token_seconds", "from submission (queue included) to the first token", self.ttft),
                    ("time_per_output_token_seconds", "mean time between tokens after the first, per sequence",
                     self.tpot)]:
                lines += [f"# HELP edgepanel_{name} {help_}", f"# TYPE edgepanel_{name} histogram"]
                lines += h.lines(f"edgepanel_{name}")
        return "\n".join(lines) + "\n"
