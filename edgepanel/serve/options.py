"""The server's options and their defaults, in one place: `edgepanel serve` builds its command line
from these fields (help text and default), and `create_app` reads the same dataclass."""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

from ..errors import EdgepanelError

MAX_PARALLEL = 64


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


class InsecureBind(EdgepanelError, ValueError):
    """Binding an address other programs can reach, with no API key and no --insecure-no-key."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False        # a host name: it may resolve to anything


@dataclass
class ServeOptions:
    host: str = _opt("127.0.0.1", "address to listen on; any but loopback needs --api-key or --insecure-no-key")
    port: int = _opt(8080, "TCP port (0: a free one, printed at start)")
    api_key: str | None = _opt(None, "clients must send 'Authorization: Bearer KEY' (compared in constant time)")
    insecure_no_key: bool = _opt(False, "allow a non-loopback --host without an API key (prints a warning)")
    parallel: int = _opt(4, "requests decoded together, one batched forward pass per step; the rest wait in a queue")
    max_queue: int = _opt(64, "requests waiting at most; more get 503")
    ctx: int | None = _opt(None, "context per request in tokens, prompt and completion (default: the model's)")
    max_body: int = _opt(1 << 20, "largest request body in bytes (suffixes K, M, KiB, MiB); larger ones get 413")
    metrics: bool = _opt(False, "serve Prometheus metrics at GET /metrics")
    shutdown_timeout: float = _opt(30.0, "on SIGTERM, seconds in-flight requests get to finish before they are cut")
    model_id: str | None = _opt(None, "the model's id in /v1/models and in responses (default: the file's stem)")

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def integer(name, lo, hi):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                bad(name, f"must be an integer in {lo}..{hi}")

        if not isinstance(self.host, str) or not self.host:
            bad("host", "must be a non-empty address")
        integer("port", 0, 65535)
        integer("parallel", 1, MAX_PARALLEL)
        integer("max_queue", 0, 1 << 20)
        integer("max_body", 1024, 1 << 30)
        if self.ctx is not None:
            integer("ctx", 2, 1 << 24)
        if not isinstance(self.shutdown_timeout, (int, float)) or not 0 <= self.shutdown_timeout < math.inf:
            bad("shutdown_timeout", "must be a finite number of seconds >= 0")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key
                                         or not self.api_key.isprintable() or any(c.isspace() for c in self.api_key)):
            raise ValueError("api_key must be a non-empty string of printable characters without spaces")
        if self.model_id is not None and (not isinstance(self.model_id, str) or not self.model_id.strip()):
            bad("model_id", "must be a non-empty string")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure_no_key:
            raise InsecureBind(f"--host {self.host} lets other machines in: give --api-key (or --api-key-file), "
                               "or --insecure-no-key to serve anyone who can reach it")

    def warning(self) -> str | None:
        """What the operator should hear before the server starts, if anything."""
        if not is_loopback(self.host) and self.api_key is None:
            return (f"serving {self.host} without an API key (--insecure-no-key): anyone who reaches this "
                    "port can use the model")
        return None


def parse_size(text: str) -> int:
    """'1MiB', '512K', '1000000' -> bytes (K/M/G and KiB/MiB/GiB are both powers of 1024)."""
    s = str(text).strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(s[-1:], 1)
    num = s[:-1] if mult > 1 else s
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 1MiB, 512K, 100000)") from None
    if not math.isfinite(value) or value < 0 or value * mult != int(value * mult):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value * mult)
