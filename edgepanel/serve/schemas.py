"""The OpenAI wire format: requests checked field by field (a bad one is a 400 naming the field, in
OpenAI's error shape) and turned into a `GenRequest`; responses and stream chunks built as OpenAI
clients parse them.

Sampling: a field the request leaves out takes edgepanel.sample.Sampling's default (temperature 0.7,
top_p 0.95, min_p 0.05, repetition_penalty 1.1, max_tokens 256), not OpenAI's (temperature 1, top_p
1, no cut-offs): OpenAI's suit large models, and a small binarized model sampled without cut-offs
drifts into rare-token gibberish (docs/quality.md measures the choice).  top_k, min_p and
repetition_penalty are accepted as extra fields (the openai client sends them with extra_body).

edgepanel's own fields: `panel` (a panel, edgepanel/panels/, as the prompt instead of messages or a
prompt; checked against the panel schema on a worker thread, app.Server.prompt) and `best_of` (n
candidates, the one with the highest implicit reward returned: edgepanel/tune/reward.py)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_N = 8                 # choices per request
MAX_STOP = 16             # stop strings per request
MAX_TOP_LOGPROBS = 20     # chat's top_logprobs (completions' logprobs: 5, as OpenAI)
MAX_LOGIT_BIAS = 1024     # entries
MAX_BEST_OF = 8           # best_of's candidates


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, why: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param} {why}", param=param, code=code)


@dataclass
class GenRequest:
    """One request, checked: what to continue and how."""
    kind: str                          # "chat" or "completion"
    prompt: object                     # chat: messages; completion: text or token ids
    sampling: dict                     # Sampling's fields the request gave (the rest: defaults)
    max_tokens_given: bool = False     # an explicit max_tokens must fit the context, else 400
    n: int = 1
    stream: bool = False
    include_usage: bool = False        # stream_options.include_usage: a last chunk with usage
    logprobs: int | None = None        # alternatives per token (0: the chosen token's only); None: off
    logit_bias: dict = field(default_factory=dict)   # token id -> added to its logit
    echo: bool = False                 # completions: the prompt's text before the completion
    panel: object = None               # the panel's JSON (checked when rendered); prompt is then None
    best_of: int = 1                   # candidates sampled, the best by implicit reward returned


# Fields a request may carry that change nothing here (metadata, or options of features this
# server does not offer whose value is the default).
IGNORED = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier"}
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "audio", "prediction", "suffix",
               "web_search_options", "reasoning_effort", "modalities", "response_format"}


def parse_json(raw: bytes):
    def constant(name):
        raise ValueError(f"{name} is not JSON")
    try:
        body = json.loads(raw, parse_constant=constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body, name, lo, hi):
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or not lo <= v <= hi:
        raise bad(name, f"must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _num(body, name, lo, hi, lo_open=False):
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        raise bad(name, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def _bool(body, name):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(name, f"must be true or false, got {v!r}")
    return v


def _common(body: dict, known: set, vocab_size: int, ctx: int) -> tuple[dict, dict]:
    """The fields both endpoints share: (Sampling's keyword arguments, the rest)."""
    for name in body:
        if name in UNSUPPORTED and body[name] not in (None, [], {}, {"type": "text"}, ["text"]):
            raise bad(name, "is not supported by this server", code="unsupported_parameter")
        if name not in known and name not in IGNORED and name not in UNSUPPORTED:
            raise bad(name, "is not a field of this request (unrecognized)", code="unknown_parameter")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise bad("model", "must be a string")
    s = {}
    s["temperature"] = _num(body, "temperature", 0, 2)
    s["top_p"] = _num(body, "top_p", 0, 1, lo_open=True)
    s["top_k"] = _int(body, "top_k", 0, vocab_size)
    s["min_p"] = _num(body, "min_p", 0, 1)
    if s["min_p"] == 1:
        raise bad("min_p", "must be in [0, 1), got 1")
    s["repetition_penalty"] = _num(body, "repetition_penalty", 0, 10, lo_open=True)
    s["seed"] = _int(body, "seed", 0, 2**63 - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(x, str) and x for x in stop):
            raise bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them")
        s["stop"] = stop
    for name in ("frequency_penalty", "presence_penalty"):
        v = _num(body, name, -2, 2)
        if v:
            raise bad(name, "is not supported (only 0); use repetition_penalty (e.g. 1.1)",
                      code="unsupported_parameter")
    rest = {"n": _int(body, "n", 1, MAX_N) or 1, "stream": bool(_bool(body, "stream"))}
    rest["best_of"] = _int(body, "best_of", 1, MAX_BEST_OF) or 1
    if rest["best_of"] > 1 and rest["stream"]:
        raise bad("best_of", "cannot be combined with stream: true (the candidates are ranked once all are "
                  "written); leave out stream, or best_of", code="unsupported_parameter")
    if rest["best_of"] > 1 and rest["n"] > 1:
        raise bad("best_of", "cannot be combined with n > 1 (best_of returns one choice, the best candidate)",
                  code="unsupported_parameter")
    opts = body.get("stream_options")
    if opts is not None:
        if not rest["stream"]:
            raise bad("stream_options", "is only allowed with stream: true")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
            raise bad("stream_options", "must be an object with include_usage (true or false)")
        rest["include_usage"] = bool(_bool(opts, "include_usage"))
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"must be an object of at most {MAX_LOGIT_BIAS} token ids to numbers")
        out = {}
        for k, v in bias.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < vocab_size):
                raise bad("logit_bias", f"keys must be token ids in 0..{vocab_size - 1}, got {k!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise bad("logit_bias", f"values must be numbers in [-100, 100], got {v!r} for {k}")
            out[int(k)] = float(v)
        rest["logit_bias"] = out
    mt = None
    for name in ("max_tokens", "max_completion_tokens"):
        v = _int(body, name, 0, ctx)
        if v is not None:
            mt = v
    if mt is not None:
        s["max_tokens"] = mt
    rest["max_tokens_given"] = mt is not None
    return {k: v for k, v in s.items() if v is not None}, rest


SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop", "n",
                   "stream", "stream_options", "logit_bias", "max_tokens", "frequency_penalty",
                   "presence_penalty", "panel", "best_of"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo"}


def _content(i: int, content) -> str:
    """A message's content as text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content", "parts must be {\"type\": \"text\", \"text\": ...} "
                          "(this server takes text only)")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content", "must be a string or a list of text parts")


def _panel_alone(body: dict, name: str, empty) -> bool:
    """Whether the request's prompt is a panel; then `name` (messages, prompt) must be absent or
    empty: the panel is the whole prompt."""
    if body.get("panel") is None:
        return False
    if body.get(name) not in (None, *empty):
        raise bad("panel", f"cannot be combined with {name}: the panel is the whole prompt "
                  f"(send {name} empty, or leave it out)")
    return True


def parse_chat(body: dict, vocab_size: int, ctx: int) -> GenRequest:
    sampling, rest = _common(body, CHAT_FIELDS, vocab_size, ctx)
    lp = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not lp:
        raise bad("top_logprobs", "needs logprobs: true")
    logprobs = (top or 0) if lp else None
    if _panel_alone(body, "messages", ([],)):
        return GenRequest("chat", None, sampling, logprobs=logprobs, panel=body["panel"], **rest)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list of {\"role\": ..., \"content\": ...}")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise bad(f"messages[{i}]", "must be an object with a string role")
        if m.get("tool_calls") or m["role"] in ("tool", "function"):
            raise bad(f"messages[{i}]", "tool calls are not supported by this server", code="unsupported_parameter")
        role = "system" if m["role"] == "developer" else m["role"]   # OpenAI's newer name for system
        messages.append({"role": role, "content": _content(i, m.get("content"))})
    return GenRequest("chat", messages, sampling, logprobs=logprobs, **rest)


def parse_completion(body: dict, vocab_size: int, ctx: int) -> GenRequest:
    sampling, rest = _common(body, COMPLETION_FIELDS, vocab_size, ctx)
    lp = _int(body, "logprobs", 0, 5)
    echo = bool(_bool(body, "echo"))
    if _panel_alone(body, "prompt", ("", [])):
        return GenRequest("completion", None, sampling, logprobs=lp, echo=echo, panel=body["panel"], **rest)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                               # a batch of one
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        if min(p) < 0 or max(p) >= vocab_size:
            raise bad("prompt", f"token ids must be in 0..{vocab_size - 1}")
    elif isinstance(p, list) and len(p) > 1:
        raise bad("prompt", "must be one prompt per request (a string or a list of token ids)")
    elif not isinstance(p, str) or not p:
        raise bad("prompt", "must be a non-empty string or a non-empty list of token ids")
    return GenRequest("completion", p, sampling, logprobs=lp, echo=echo, **rest)


# -- responses --------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries) -> dict:
    """entries: [(token text, logprob, [(text, logprob), ...])] -> chat's logprobs object."""
    def one(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [dict(one(t, lp), top_logprobs=[one(a, b) for a, b in top]) for t, lp, top in entries]}


def completion_logprobs(entries, offset: int) -> dict:
    """entries as chat_logprobs; offset: the text's position in the choice's text."""
    offsets = []
    for t, _, _ in entries:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}


def best_of(best, beta: float, finish: list) -> dict:
    """The extension field of a best_of response: the chosen candidate's place, beta, and every
    candidate as edgepanel.best_of reports it (reward.Candidate's fields; the -inf of an empty
    continuation as null) with its finish_reason."""
    def num(x: float):
        return x if math.isfinite(x) else None
    return {"chosen": best.index, "beta": beta,
            "candidates": [{"text": c.text, "seed": c.seed, "tokens": c.tokens, "logp": num(c.logp),
                            "ref_logp": num(c.ref_logp), "reward": num(c.reward), "mean_logp": num(c.mean_logp),
                            "finish_reason": f} for c, f in zip(best.candidates, finish)]}


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"
