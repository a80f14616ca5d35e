"""Text <-> token ids (Hugging Face `tokenizers`) and chat templates (jinja2, as transformers
renders them).  The tokenizer travels inside the model file."""
from __future__ import annotations

import json
from datetime import datetime

from .errors import EdgepanelError, FormatError


class TokenizerMissing(EdgepanelError):
    """The model file carries no tokenizer: it takes token ids only."""


class Tokenizer:
    def __init__(self, tokenizer_json: str | None, info: dict, where: str = "model"):
        self.where = where
        self.info = info or {}
        self.bos_id = self.info.get("bos_id")
        self.eos_ids = [int(e) for e in self.info.get("eos_ids") or []]
        self.chat_template = self.info.get("chat_template")
        self._tok = None
        if tokenizer_json:
            try:
                from tokenizers import Tokenizer as HFTokenizer
                self._tok = HFTokenizer.from_str(tokenizer_json)
            except Exception as exc:  # the tokenizers library raises its own exception type
                raise FormatError(f"{where}: the embedded tokenizer does not load ({exc})") from None

    @property
    def available(self) -> bool:
        return self._tok is not None

    def _need(self):
        if self._tok is None:
            raise TokenizerMissing(f"{self.where} has no tokenizer (it was converted without tokenizer.json); "
                                   "pass token ids instead of text")
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._need().get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._need().encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.info.get("add_bos") and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._need().decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self._need().token_to_id(token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise EdgepanelError(f"{self.where} has no chat template; pass a plain prompt instead of messages")
        validate_messages(messages)
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            tmpl = env.from_string(self.chat_template)
            return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.info.get("bos_token") or "", eos_token=self.info.get("eos_token") or "")
        except TemplateError as exc:
            raise EdgepanelError(f"chat template: {exc}") from None


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
