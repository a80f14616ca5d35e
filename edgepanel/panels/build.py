"""Panel datasets from books: for each target paragraph, the panel its writer would have had.

Without a model, documented extractive heuristics fill the panel (deterministic):

    latest        the paragraph before the target
    characters    names met so far (first appearance at or before the target) that the previous
                  paragraph or the target mentions, at most 6, each described by the sentence
                  where it first appears (at most 25 words).  A name is a run of capitalized words
                  seen at least 3 times in the book, not at a sentence start unless after a title
                  (Mr., Mrs., Miss, ...), and never written in lower case elsewhere; it is a person
                  when a title or a speech verb ("said Emma") goes with it at least once
    places        names of the same kind that are not persons and carry a place word (Hall, Park,
                  Abbey, ...) or follow "at/in/to/from/near" more often than not; at most 4
    memory.short  the first sentence (at most 20 words) of each of the three paragraphs before
                  `latest`
    memory.long   one entry per earlier chapter (the last 4): the first sentence (at most 20
                  words) of its first paragraph of 15 words or more
    plan          what happens in the target: the persons it names and its 8 most distinctive
                  words (tf-idf within the book), in the order they occur
    goals         where the chapter goes: the most distinctive words of the rest of the chapter
    tasks         the paragraph's place (chapter, paragraph), its length, dialogue or narration

With a model (`summarizer`), the model writes memory.short, memory.long entries and the plan,
RecurrentGPT-style, from the prompts in `prompts.json`.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .books import Book
from .render import sentences
from .schema import Entity, Memory, Panel

TITLES = ("Mr.", "Mrs.", "Miss", "Lady", "Sir", "Lord", "Colonel", "Captain", "Admiral", "Dr.", "Mr", "Mrs")
SPEECH = ("said", "cried", "replied", "answered", "returned", "continued", "exclaimed", "added")
PLACE_WORDS = ("Hall", "Park", "Abbey", "House", "Street", "Lodge", "Cottage", "Place", "Square", "Court",
               "Manor", "Grove", "Castle", "Church", "Parsonage", "Rooms", "Crescent", "Buildings", "Farm",
               "Mill", "Common", "Hill", "Road", "Lane", "Inn")
PLACE_PREPS = ("at", "in", "to", "from", "near", "into", "towards", "of")
STOP = set("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most my
myself no nor not now of off on once only or other our ours ourselves out over own same she should so some
such than that the their theirs them themselves then there these they this those through to too under
until up very was we were what when where which while who whom why will with would you your yours yourself
yourselves shall must might may said upon every much many never ever well quite yet though although one
two being own made make thing things little great good nothing something anything every everything indeed
without within could would should""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")
_NAME = re.compile(r"(?:(?:Mr|Mrs|Dr)\.?\s|(?:Miss|Lady|Sir|Lord|Colonel|Captain|Admiral)\s)?[A-Z][a-z]+(?:\s[A-Z][a-z]+)*")
NOT_NAMES = set("""I Oh Ah Yes No Well Sir Madam Ma'am God Heaven Heavens Lord Monday Tuesday Wednesday
Thursday Friday Saturday Sunday January February March April May June July August September October
November December Christmas Michaelmas English England London Chapter The A An But And Mr Mrs Miss Lady Dear
Indeed Upon Nay Aye Pray Perhaps Certainly""".split())


@dataclass
class Names:
    persons: set
    places: set
    first: dict          # name -> (paragraph index, sentence) of its first appearance


def _mentions(text: str):
    """(name, preceding word, following word, at sentence start) for each capitalized run."""
    for sent in sentences(text):
        for m in _NAME.finditer(sent):
            name = m.group(0)
            before = sent[:m.start()].rstrip()
            prev = before.split()[-1].strip("\"'(\u201c") if before.split() else ""
            after = sent[m.end():].lstrip(" ,\"'\u201d").split()
            nxt = after[0].strip(",.;:!?\"'") if after else ""
            start = not before.strip("\"'\u201c( ")
            yield name, prev.lower(), nxt.lower(), start, sent


def find_names(book: Book) -> Names:
    lower_words = {w for p in book.paragraphs for w in _WORD.findall(p.text) if w[0].islower()}
    count, titled, speaks, placed, prepped = Counter(), Counter(), Counter(), Counter(), Counter()
    for p in book.paragraphs:
        for name, prev, nxt, start, sent in _mentions(p.text):
            has_title = name.split()[0].rstrip(".") in {t.rstrip(".") for t in TITLES}
            if start and not has_title:
                continue
            words = name.split()
            if not has_title and (name in NOT_NAMES or any(w.lower() in lower_words or w in NOT_NAMES for w in words)):
                continue
            count[name] += 1
            titled[name] += has_title
            speaks[name] += prev in SPEECH or nxt in SPEECH
            placed[name] += words[-1] in PLACE_WORDS
            prepped[name] += prev in PLACE_PREPS
    bare_titles = {t.rstrip(".") for t in TITLES} | set(TITLES)
    frequent = {n for n, c in count.items() if c >= 3 and n not in bare_titles and len(n) > 2}
    persons = {n for n in frequent if titled[n] or speaks[n]}
    places = {n for n in frequent - persons if placed[n] or prepped[n] * 2 > count[n]}
    return Names(persons, places, first_sentences(book, persons | places))


def first_sentences(book: Book, names) -> dict:
    """name -> (paragraph index, sentence) where it first appears as a whole word, anywhere."""
    left, out = set(names), {}
    for p in book.paragraphs:
        for sent in sentences(p.text):
            for n in [n for n in left if n in sent]:
                if _mentioned([n], sent):
                    out[n] = (p.index, sent)
                    left.discard(n)
        if not left:
            break
    return out


def clip_words(text: str, n: int) -> str:
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " …"


def _mentioned(names, text: str) -> list[str]:
    return [n for n in names if re.search(r"(?<![A-Za-z])" + re.escape(n) + r"(?![a-z])", text)]


class _Idf:
    def __init__(self, book: Book):
        df = Counter()
        for p in book.paragraphs:
            df.update({w.lower() for w in _WORD.findall(p.text)})
        self.n = len(book.paragraphs)
        self.df = df

    def keywords(self, text: str, k: int, exclude=()) -> list[str]:
        words = [w.lower() for w in _WORD.findall(text)]
        tf = Counter(w for w in words if w not in STOP and len(w) > 3 and w not in exclude)
        score = {w: c * math.log(self.n / (1 + self.df[w])) for w, c in tf.items()}
        top = set(sorted(score, key=lambda w: (-score[w], w))[:k])
        seen, out = set(), []
        for w in words:
            if w in top and w not in seen:
                seen.add(w)
                out.append(w)
        return out


def _first_sentence(text: str, words: int = 30) -> str:
    s = sentences(text)
    return clip_words(s[0] if s else text, words)


class PanelBuilder:
    """Panels for the paragraphs of one book."""

    def __init__(self, book: Book, summarizer=None):
        self.book = book
        self.names = find_names(book)
        self.idf = _Idf(book)
        self.summarizer = summarizer
        self.chapters: dict[int, list] = {}
        for p in book.paragraphs:
            self.chapters.setdefault(p.chapter, []).append(p)

    def _entities(self, pool, i: int, limit: int) -> tuple[Entity, ...]:
        paras = self.book.paragraphs
        scene = paras[i].text + " " + (paras[i - 1].text if i else "")
        met = sorted((n for n in pool if self.names.first[n][0] <= i), key=lambda n: (self.names.first[n][0], n))
        return tuple(Entity(n, clip_words(self.names.first[n][1], 25)) for n in _mentioned(met, scene)[:limit])

    def _chapter_entry(self, ch: int) -> str | None:
        paras = self.chapters.get(ch, [])
        if self.summarizer is not None and paras:
            return self.summarizer.chapter(" ".join(p.text for p in paras))
        for p in paras:
            if len(p.text.split()) >= 15:
                return f"Chapter {ch}: {_first_sentence(p.text, 20)}"
        return None

    def panel(self, i: int) -> Panel:
        paras = self.book.paragraphs
        target = paras[i]
        ch = target.chapter
        latest = paras[i - 1].text if i else None
        recent = [p.text for p in paras[max(0, i - 4):max(0, i - 1)]]
        if self.summarizer is not None:
            short = self.summarizer.memory(recent) if recent else None
            plan = self.summarizer.plan(target.text)
        else:
            short = " ".join(_first_sentence(t, 20) for t in recent) or None
            who = _mentioned(sorted(self.names.persons), target.text)
            plan = (f"With {', '.join(who)}. " if who else "") + "About: " + ", ".join(
                self.idf.keywords(target.text, 8, exclude={w.lower() for n in who for w in n.split()})) + "."
        long = [e for c in sorted(self.chapters) if 0 < c < ch for e in [self._chapter_entry(c)] if e][-4:]
        rest = [p.text for p in self.chapters[ch] if p.index > i]
        goals = [f"Where chapter {ch} goes: " + ", ".join(self.idf.keywords(" ".join(rest), 6)) + "."] if rest else []
        pos = [p.index for p in self.chapters[ch]].index(i) + 1
        words = len(target.text.split())
        quoted = sum(len((a or b).split()) for a, b in re.findall(r"\"([^\"]*)\"|\u201c([^\u201d]*)\u201d", target.text))
        kind = "mostly dialogue" if quoted * 2 > words else "narration"
        tasks = [f"Write paragraph {pos} of chapter {ch} of {self.book.title}, about {max(10, round(words, -1))} words, {kind}."]
        return Panel(latest=latest, characters=self._entities(sorted(self.names.persons), i, 6),
                     places=self._entities(sorted(self.names.places), i, 4), plan=plan, goals=tuple(goals),
                     memory=Memory(short, tuple(long)) if (short or long) else None, tasks=tuple(tasks))


@lru_cache(maxsize=1)
def prompts() -> dict:
    """The prompts a model is given to summarize and plan (data build and the story loop)."""
    return json.loads(Path(__file__).with_name("prompts.json").read_text(encoding="utf-8"))


class ModelSummarizer:
    """Summaries written by a model, greedily (deterministic), from the prompts in prompts.json."""

    def __init__(self, model, max_tokens: int = 60):
        self.model, self.max_tokens = model, max_tokens

    def ask(self, key: str, **fields) -> str:
        text = prompts()[key].format(**fields)
        prompt = [{"role": "user", "content": text}] if self.model.tokenizer.chat_template else text
        out = self.model.generate(prompt, max_tokens=self.max_tokens, temperature=0.0, truncate=True)
        return " ".join(out.split()) or "(nothing)"

    def memory(self, paragraphs: list[str]) -> str:
        return self.ask("memory_short", text="\n\n".join(paragraphs))

    def plan(self, paragraph: str) -> str:
        return self.ask("plan", text=paragraph)

    def chapter(self, text: str) -> str:
        return self.ask("memory_long", text=clip_words(text, 600))


def choose_targets(book: Book, limit: int | None, seed: int, min_words: int = 20, max_words: int = 250) -> list[int]:
    """Indices of target paragraphs: after the first paragraph of the book, min..max words; a
    seeded, sorted sample of `limit` of them."""
    idx = [p.index for p in book.paragraphs[1:] if min_words <= len(p.text.split()) <= max_words and p.chapter > 0]
    if limit is not None and limit < len(idx):
        rng = np.random.default_rng(seed)
        idx = sorted(rng.choice(idx, size=limit, replace=False).tolist())
    return idx


def build_lines(book: Book, limit: int | None = None, seed: int = 0, summarizer=None, source: str | None = None):
    """The dataset lines (dicts) for `book`."""
    builder = PanelBuilder(book, summarizer)
    for i in choose_targets(book, limit, seed):
        doc = builder.panel(i).to_dict()
        yield {"panel": doc, "target": book.paragraphs[i].text,
               "x-source": {"book": source or book.title, "paragraph": i, "chapter": book.paragraphs[i].chapter}}
