"""Fuzz the chat-template renderer: any template text renders to a string or raises
ChatTemplateError, within its budget (a small one here, so that a run stays fast)."""
import atheris

from common import main
from seeds import MESSAGES

with atheris.instrument_imports(include=["edgepanel"]):
    from edgepanel.errors import EdgepanelError
    from edgepanel.tokenizer import TemplateBudget, Tokenizer

BUDGET = TemplateBudget(steps=200_000, seconds=2.0, chars=1 << 20)


def test_one_input(data: bytes):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    tok = Tokenizer(None, {"chat_template": text, "bos_token": "<s>", "eos_token": "</s>"})
    try:
        out = tok.apply_chat_template(MESSAGES, budget=BUDGET)
    except EdgepanelError:
        return
    assert isinstance(out, str) and len(out) <= BUDGET.chars


if __name__ == "__main__":
    main(test_one_input)
