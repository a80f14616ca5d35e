"""Fuzz the panel and dataset parsers (edgepanel.panels): any JSON Lines file of panels either
loads, and every panel renders within a token budget, or stops with an edgepanel error naming
the line and field."""
import random

import atheris

from common import main, mutate_json_bytes, scratch
from seeds import CHAT_TEMPLATE, tokenizer_json

with atheris.instrument_imports(include=["edgepanel"]):
    from edgepanel.errors import EdgepanelError
    from edgepanel.panels import dataset
    from edgepanel.panels.render import render
    from edgepanel.tokenizer import Tokenizer

TOKENIZER = Tokenizer(tokenizer_json(), {"chat_template": CHAT_TEMPLATE, "eos_ids": [1]})


def mutate_lines(data: bytes, max_size: int, seed: int) -> bytes:
    """One line of the file changed as a JSON document (else libFuzzer's own mutation)."""
    lines = data.split(b"\n")
    i = random.Random(seed).randrange(len(lines))
    lines[i] = mutate_json_bytes(lines[i], max_size, seed)
    return b"\n".join(lines)[:max_size]


def test_one_input(data: bytes):
    path = scratch("panels.jsonl")
    path.write_bytes(data)
    try:
        for ex in dataset.load(path):
            for budget in (None, 48):
                render(ex.panel, TOKENIZER, budget)
    except EdgepanelError:
        pass


if __name__ == "__main__":
    main(test_one_input, mutate_lines)
