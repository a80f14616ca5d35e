"""Write edgepanel/data/calib.txt: the default calibration text for `edgepanel convert`.

The text is written by SmolLM2-135M-Instruct itself, converted in pass-through mode (its own
dequantized weights, no binarization), from the varied prompts below: it exercises the model on
the kind of text it produces, and it is free of anyone else's copyright.  The recipe is recorded
in the file's first line so the text can be rebuilt exactly:

    python tools/make_calib.py            # about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SEED = 1234
MAX_TOKENS = 180
SAMPLING = dict(temperature=0.8, top_p=0.95, min_p=0.0, repetition_penalty=1.1)

CHAT = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Describe a busy market in a coastal town at dawn.",
    "Write a poem about autumn leaves and a river.",
    "What are three tips for learning a new language?",
    "Tell me a fable about a fox and a crow, with a moral.",
    "Explain the difference between weather and climate.",
    "Write a dialogue between a baker and a customer who wants a special cake.",
    "Give step-by-step instructions for planting a tomato seedling.",
    "Describe the life cycle of a butterfly.",
    "Write a letter from a traveler to her brother about crossing the mountains.",
    "Why is the sky blue? Answer in a paragraph.",
    "Summarize the plot of a mystery novel you invent, in five sentences.",
    "Write a diary entry of a child on the first day of school.",
    "Explain what a computer program is and give a simple example in Python.",
    "Describe a thunderstorm from the point of view of a cat.",
    "List five healthy breakfast ideas and say why each is good.",
    "Write a speech for the opening of a small public library.",
    "Explain how a bicycle stays upright while moving.",
    "Tell a story about two friends who build a raft.",
    "What is the water cycle? Explain each stage.",
    "Write a recipe for vegetable soup with clear steps.",
    "Describe an old castle on a hill and the village below it.",
    "Write a short mystery scene in a train compartment at night.",
    "Explain why exercise is good for the heart.",
    "Write a poem about the moon and the sea.",
    "How do bees make honey? Explain simply.",
    "Write a conversation between a student and a teacher about the planets.",
    "Describe a winter morning in a forest.",
    "Give advice to someone who is nervous about a job interview.",
    "Explain what gravity is, with an everyday example.",
    "Write the opening paragraph of an adventure story at sea.",
]
PLAIN = [
    "Once upon a time, in a small village between two hills,",
    "The history of the printing press begins",
    "In the morning the fishermen gathered on the beach and",
    "The most important thing to know about volcanoes is",
    "Dear diary, today something strange happened.",
    "The recipe calls for flour, butter, and",
    "When the old clock in the hall struck midnight,",
    "Scientists have long wondered why",
    "The train left the station just as",
    "Chapter One. The house on Elm Street had been empty for years,",
    "There are many ways to save energy at home. First,",
    "The forest was quiet except for",
    "In 1850, the town of",
    "My grandmother always told me that",
    "To understand how computers store numbers, we start with",
    "The river wound through the valley, past",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "edgepanel/data/calib.txt")
    ap.add_argument("--model", type=Path, default=None, help="a pass-through SmolLM2 model file (made if absent)")
    args = ap.parse_args()
    from edgepanel import hub
    from edgepanel.convert import Recipe, convert
    from edgepanel.model.model import load

    path = args.model or hub.converted_path("smollm2", "passthrough")
    if not path.exists():
        convert(hub.fetch("smollm2"), path, Recipe(passthrough=True))
    m = load(path)
    recipe = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf, pass-through", "seed": SEED, "max_tokens": MAX_TOKENS,
              "sampling": SAMPLING, "prompts": len(CHAT) + len(PLAIN)}
    parts, t0 = [], time.time()
    for i, p in enumerate(CHAT + PLAIN):
        chat = i < len(CHAT)
        text = m.generate(p, max_tokens=MAX_TOKENS, chat=chat, seed=SEED + i, **SAMPLING)
        parts.append(text.strip() if chat else (p + text).strip())
        print(f"[{i + 1}/{len(CHAT) + len(PLAIN)}] {time.time() - t0:.0f} s", flush=True)
    body = "\n\n".join(parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# edgepanel calibration text; recipe: " + json.dumps(recipe) + "\n\n" + body + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(body)} characters, {len(m.tokenizer.encode(body))} tokens")


if __name__ == "__main__":
    main()
