"""Text <-> token ids (Hugging Face `tokenizers`) and chat templates (jinja2, as transformers
renders them).  The tokenizer travels inside the model file.

A chat template comes with the model file, so it is untrusted code: it renders in jinja2's
immutable sandbox (no attribute writes, no private attributes, ranges of at most 100000) under a
budget (TEMPLATE_BUDGET): Python lines run while rendering (the template's and jinja's), wall
time, and characters of any one string or list it builds and of its output.  Going over any of
them is a ChatTemplateError, never a hang or an unbounded allocation."""
from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime

from .errors import EdgepanelError, FormatError


class TokenizerMissing(EdgepanelError):
    """The model file carries no tokenizer: it takes token ids only."""


class ChatTemplateError(EdgepanelError):
    """The chat template does not render: an error in it, or it ran over its budget."""


@dataclass(frozen=True)
class TemplateBudget:
    steps: int = 2_000_000     # Python lines executed while rendering (the real templates measured in
                               # docs/hostile.md take 10^3-10^4)
    seconds: float = 5.0       # wall time, the backstop for work done inside C between two lines
    chars: int = 1 << 24       # characters (or items) of the output and of any one value built


TEMPLATE_BUDGET = TemplateBudget()

# what the model file's tokenizer info may hold: key -> (types allowed, what it is)
INFO_TYPES = {"bos_id": ((int, type(None)), "a token id or null"),
              "eos_ids": ((list,), "a list of token ids"),
              "add_bos": ((bool,), "true or false"),
              "chat_template": ((str, type(None)), "a string or null"),
              "bos_token": ((str, type(None)), "a string or null"),
              "eos_token": ((str, type(None)), "a string or null"),
              "generation": ((dict,), "an object")}


def check_tokenizer_info(info, where: str) -> dict:
    """`info` (special tokens, chat template, ...) checked field by field; FormatError naming the
    field when one has the wrong type."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise FormatError(f"{where}: tokenizer info must be an object, got {type(info).__name__}")
    for key, (types, what) in INFO_TYPES.items():
        v = info.get(key)
        if key in info and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
            raise FormatError(f"{where}: tokenizer info '{key}' must be {what}, got {v!r:.80}")
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in info.get("eos_ids") or []):
        raise FormatError(f"{where}: tokenizer info 'eos_ids' must be a list of token ids, got {info['eos_ids']!r:.80}")
    if info.get("bos_id") is not None and info["bos_id"] < 0:
        raise FormatError(f"{where}: tokenizer info 'bos_id' must be a token id, got {info['bos_id']}")
    return info


class Tokenizer:
    def __init__(self, tokenizer_json: str | None, info: dict, where: str = "model"):
        self.where = where
        self.info = check_tokenizer_info(info, where)
        self.bos_id = self.info.get("bos_id")
        self.eos_ids = list(self.info.get("eos_ids") or [])
        self.chat_template = self.info.get("chat_template")
        self._template = None   # compiled on first use
        self._tok = None
        if tokenizer_json:
            from tokenizers import Tokenizer as HFTokenizer
            with _library_errors(f"{where}: the embedded tokenizer does not load"):
                tok = HFTokenizer.from_str(tokenizer_json)
                # edgepanel encodes whole texts and minds the context itself: a tokenizer.json's padding
                # or truncation would only change the ids silently (padded to 2^40, it aborts the process)
                tok.no_padding()
                tok.no_truncation()
            self._tok = tok

    @property
    def available(self) -> bool:
        return self._tok is not None

    def _need(self, decoding: bool = False):
        if self._tok is None:
            raise TokenizerMissing(f"{self.where} has no tokenizer (it was converted without tokenizer.json): "
                                   + ("it cannot turn token ids into text; use generate_ids() for new token ids"
                                      if decoding else "pass token ids instead of text"))
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._need().get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._need()
        with _library_errors(f"{self.where}: the embedded tokenizer failed to encode"):
            ids = tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.info.get("add_bos") and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        tok = self._need(decoding=True)
        with _library_errors(f"{self.where}: the embedded tokenizer failed to decode"):
            return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self._need().token_to_id(token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            budget: TemplateBudget = TEMPLATE_BUDGET) -> str:
        """The prompt text of `messages`, rendered by the model's chat template within `budget`."""
        if not self.chat_template:
            raise EdgepanelError(f"{self.where} has no chat template; pass a plain prompt instead of messages")
        validate_messages(messages)
        if self._template is None or self._template[0] != budget.chars:   # the sandbox's checks use budget.chars
            self._template = (budget.chars, compile_template(self.chat_template, budget.chars))
        return render_template(self._template[1], budget, messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.info.get("bos_token") or "", eos_token=self.info.get("eos_token") or "")


# -- chat templates -------------------------------------------------------------------------------

_WIDE_FORMAT = re.compile(r"\d{8,}")   # a width or precision of 10^7 and more in a format string


class _OverBudget(Exception):
    pass


def _checked_size(value, limit: int):
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > limit:
        raise _OverBudget(f"a value of {len(value)} characters or items (limit {limit})")
    return value


def _checked_args(args, limit: int):
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise _OverBudget(f"an argument of {a} (limit {limit})")


def _sandbox(limit: int):
    """jinja2's immutable sandbox with every call, filter, operator and concatenation checked
    against `limit` (characters or items of a value; integer arguments)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    def checked(f):
        @functools.wraps(f)   # keeps jinja's pass_context / pass_environment marks
        def call(*args, **kwargs):
            _checked_args(list(args) + list(kwargs.values()), limit)
            return _checked_size(f(*args, **kwargs), limit)
        return call

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and right * max(left.bit_length(), 1) > 4096:
                raise _OverBudget(f"{left} ** {right}")
            if operator == "*":
                for a, b in ((left, right), (right, left)):
                    if isinstance(b, int) and (hasattr(a, "__len__") and len(a) * b > limit
                                               or isinstance(a, int) and a.bit_length() + b.bit_length() > 4096):
                        raise _OverBudget(f"a product of {b} and a value of size {len(a) if hasattr(a, '__len__') else a}")
            if operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__") and len(left) + len(right) > limit:
                raise _OverBudget(f"a concatenation of {len(left) + len(right)} (limit {limit})")
            if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise _OverBudget("a format with a width of 10^7 or more")
            return _checked_size(super().call_binop(context, operator, left, right), limit)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's signature)
            _checked_args(list(args) + list(kwargs.values()), limit)
            return _checked_size(super().call(__context, __obj, *args, **kwargs), limit)

        def wrap_str_format(self, value):   # str.format, str.format_map, as the sandbox hands them out
            wrapped = super().wrap_str_format(value)
            if wrapped is not None and _WIDE_FORMAT.search(value.__self__):
                def refuse(*args, **kwargs):
                    raise _OverBudget("a format with a width of 10^7 or more")
                return refuse
            return wrapped

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.filters = {name: checked(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.concat = checked("".join)   # {% set %} blocks
    return env


def compile_template(source: str, limit: int = TEMPLATE_BUDGET.chars):
    """A chat template compiled in the checked sandbox; ChatTemplateError when it does not parse."""
    if not isinstance(source, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(source).__name__}")
    env = _sandbox(limit)
    try:
        tmpl = env.from_string(source)
    except Exception as exc:  # noqa: BLE001 - jinja raises its own errors and Python's (RecursionError, ...)
        raise ChatTemplateError(f"chat template does not parse ({type(exc).__name__}: {exc})") from None
    # `a ~ b` compiles to calls of these module-level helpers: bound their result's size too
    ns = tmpl.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in ns:
            ns[name] = _bounded_join(ns[name], limit)
    return tmpl


def _bounded_join(join, limit: int):
    def bounded(seq):
        parts = list(seq)
        if sum(len(p) if isinstance(p, str) else 0 for p in parts) > limit:
            raise _OverBudget(f"a concatenation over {limit} characters")
        return join(parts)
    return bounded


class _Tracer:
    """sys.settrace hook counting the lines run while a template renders."""

    def __init__(self, budget: TemplateBudget):
        self.left = budget.steps
        self.budget = budget
        self.deadline = time.monotonic() + budget.seconds

    def __call__(self, frame, event, arg):
        return self.line

    def line(self, frame, event, arg):
        if event == "line":
            self.left -= 1
            if self.left < 0:
                raise _OverBudget(f"more than {self.budget.steps} steps")
            if time.monotonic() > self.deadline:
                raise _OverBudget(f"more than {self.budget.seconds} s")
        return self.line


def render_template(tmpl, budget: TemplateBudget = TEMPLATE_BUDGET, **variables) -> str:
    """`tmpl` (compile_template) rendered with `variables` within `budget`."""
    out, size = [], 0
    old = sys.gettrace()
    sys.settrace(_Tracer(budget))   # this thread only; restored below
    try:
        for piece in tmpl.generate(**variables):
            size += len(piece)
            if size > budget.chars:
                raise _OverBudget(f"an output over {budget.chars} characters")
            out.append(piece)
    except _OverBudget as exc:
        raise ChatTemplateError(f"chat template ran over its budget: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - an error in the template, whatever Python raised for it
        raise ChatTemplateError(f"chat template: {type(exc).__name__}: {exc}") from None
    finally:
        sys.settrace(old)
    return "".join(out)


@contextlib.contextmanager
def _library_errors(what: str):
    """The tokenizers library's errors as a FormatError: its own exception type, and a panic in its
    Rust code (pyo3's PanicException derives from BaseException, not Exception)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the library raises its own exception type
        raise FormatError(f"{what} ({exc})") from None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise FormatError(f"{what} (the tokenizers library panicked: {exc})") from None


def validate_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")


class StreamDecoder:
    """Incremental detokenization: feed ids one at a time, get the new text (never half a
    multi-byte character)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new
