"""Write edgepanel/assets/calib.txt: the default calibration text for `edgepanel convert`.

The text is written by SmolLM2-135M-Instruct itself, converted in pass-through mode (its own
dequantized weights, no binarization), from the varied prompts below: it exercises the model on
the kind of text it produces, and it is free of anyone else's copyright.  The recipe is recorded
in the file's first line so the text can be rebuilt exactly:

    python tools/make_calib.py            # about 25 minutes on 2 cores
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
# Added in the second edition (broader registers: formal and administrative prose, verse and
# songs, encyclopedic and technical writing, news, letters, lists, old-fashioned storytelling);
# the prompts above keep their seeds, so their texts are unchanged.
CHAT_MORE = [
    "Write the rules of a community garden that every member must follow.",
    "Draft a clause of a rental agreement about late payments and repairs.",
    "Write a formal letter to a city council asking for a new pedestrian crossing.",
    "Write the terms and conditions of a photography contest.",
    "Explain, in formal language, the rights and duties of a tenant.",
    "Write the bylaws of a chess club: membership, meetings, elections.",
    "Summarize the responsibilities of a company's board of directors.",
    "Write the warranty statement for a kitchen appliance.",
    "Write an official notice that a public park will close for repairs.",
    "Write the safety regulations for a school chemistry laboratory.",
    "Write a song with a chorus about the long road home.",
    "Write a lullaby for a sleepy child.",
    "Write a ballad about a sailor who never came back from the sea.",
    "Write a folk song about the harvest and the end of summer.",
    "Write a limerick about a cat who loves cheese.",
    "Write rhyming verses about a city at night.",
    "Write a poem about an old oak tree that has seen many centuries.",
    "Write a love song in simple rhymes.",
    "Write an encyclopedia entry about Roman aqueducts.",
    "Describe how a diesel engine works.",
    "Explain what a database index is and why it speeds up queries.",
    "Write the README of a small command-line tool that renames files.",
    "Explain the basic rules of chess.",
    "Write the section of a manual on cleaning and descaling a coffee machine.",
    "Explain the main causes of the French Revolution.",
    "Describe the parts of a plant cell and what each does.",
    "Write a Python function that counts word frequencies in a text file, with comments.",
    "Explain how vaccines train the immune system.",
    "Describe the geography and climate of Iceland.",
    "Explain how interest on a savings account is calculated.",
    "Write a news report about a town that won a national recycling award.",
    "Write a weather forecast for a stormy weekend on the coast.",
    "Write a sports report about a close football match decided in the last minute.",
    "Write a press release announcing the opening of a new museum.",
    "Write an email asking a colleague to review a report before Friday.",
    "Write a letter of complaint about a delayed delivery.",
    "Write a thank-you note to a neighbor who helped during a move.",
    "List the steps to change a flat tire safely.",
    "Write a packing list for a week-long camping trip, with reasons.",
    "Give a short guide to writing a good cover letter.",
    "Write a scene where two old friends meet at a train station after twenty years.",
    "Tell an old fairy tale about a shepherd and a talking wolf, in old-fashioned language.",
    "Write a ghost story set in an abandoned lighthouse.",
    "Write a science-fiction story opening on a generation ship.",
    "Write a dialogue between a detective and a nervous witness.",
    "What is the difference between a virus and a bacterium?",
    "Explain supply and demand with an example from a farmers' market.",
    "Describe the history of writing, from clay tablets to paper.",
    "Write a sermon-like speech about kindness and patience.",
    "Write a eulogy for a beloved village doctor.",
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
PLAIN_MORE = [
    "Article 1. The name of this association shall be",
    "Section 2. Definitions. For the purposes of these rules,",
    "The parties agree that any dispute arising from this agreement",
    "Members shall pay their annual dues no later than",
    "Notice is hereby given that the annual general meeting",
    "The committee may, at its discretion,",
    "O river, winding through the hills,",
    "The wind was singing in the old pine trees,",
    "Come all you young sailors and listen to me,",
    "I wandered down the dusty road at dawn,",
    "The Industrial Revolution began in Britain in the late eighteenth century",
    "A transistor is a semiconductor device that",
    "To install the software, first download",
    "The city council voted on Tuesday to",
    "In the beginning there was only the sea, and",
    "The old king had three daughters, and the youngest",
    "Dear Sir or Madam, I am writing to",
    "Chapter Seven. The storm broke over the harbor at midnight,",
    "Ingredients: two cups of flour, one egg,",
    "Frequently asked questions. How do I reset my password?",
    "The human heart has four chambers:",
    "Once the guests had gone, the house fell silent and",
    "It is a truth that every traveler learns sooner or later:",
    "Step 1. Remove the cover by unscrewing",
    "The treaty, signed in 1648, ended",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "edgepanel/assets/calib.txt")
    ap.add_argument("--model", type=Path, default=None, help="a pass-through SmolLM2 model file (made if absent)")
    args = ap.parse_args()
    from edgepanel import hub
    from edgepanel.convert import Recipe, convert
    from edgepanel.model.model import load

    path = args.model or hub.converted_path("smollm2", "passthrough")
    if not path.exists():
        convert(hub.fetch("smollm2"), path, Recipe(passthrough=True))
    m = load(path)
    # (prompt, chat?, seed): the first edition's prompts keep their seeds
    jobs = [(p, True, SEED + i) for i, p in enumerate(CHAT)]
    jobs += [(p, False, SEED + len(CHAT) + i) for i, p in enumerate(PLAIN)]
    base = SEED + len(CHAT) + len(PLAIN)
    jobs += [(p, True, base + i) for i, p in enumerate(CHAT_MORE)]
    jobs += [(p, False, base + len(CHAT_MORE) + i) for i, p in enumerate(PLAIN_MORE)]
    recipe = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf, pass-through", "seed": SEED, "max_tokens": MAX_TOKENS,
              "sampling": SAMPLING, "prompts": len(jobs), "edition": 2}
    parts, t0 = [], time.time()
    for i, (p, chat, seed) in enumerate(jobs):
        text = m.generate(p, max_tokens=MAX_TOKENS, chat=chat, seed=seed, **SAMPLING)
        parts.append(text.strip() if chat else (p + text).strip())
        print(f"[{i + 1}/{len(jobs)}] {time.time() - t0:.0f} s", flush=True)
    body = "\n\n".join(parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# edgepanel calibration text; recipe: " + json.dumps(recipe) + "\n\n" + body + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(body)} characters, {len(m.tokenizer.encode(body))} tokens")


if __name__ == "__main__":
    main()
