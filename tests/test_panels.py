"""Panels: the schema (every field, bad types, extra fields, line numbers), rendering within a
budget (the documented priority, whole sentences and items, deterministic), the loss mask (the
panel changes the context only), data built from a text with known characters and places, the
janeaustenr reader on a lazy-load database written here, evaluation against a float64 hand
computation, the story loop (N valid lines, resume), and clear errors from the CLI."""
import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from edgepanel.cli import main
from edgepanel.convert import Recipe, convert
from edgepanel.kernels import native
from edgepanel.model import load
from edgepanel.panels import Entity, Memory, Panel, PanelError, load_panel, parse, render
from edgepanel.panels import books, build, dataset, schema
from edgepanel.panels.evaluate import evaluate, token_stats
from edgepanel.panels.render import PRIORITY, body, sentences
from edgepanel.panels.story import parse_characters, resume_point, write_story
from hf_models import checkpoint_with_tokenizer

FULL = {
    "latest": "Anna walked to the mill. She was tired. The sun was low.",
    "characters": [{"name": "Anna", "description": "a miller's daughter"}, {"name": "Tom", "description": "her brother"}],
    "places": [{"name": "Rosewood Hall", "description": "a grey house on the hill"}],
    "plan": "Anna meets Tom. They argue about the mill.",
    "goals": ["Anna leaves the village", "Tom keeps the mill"],
    "memory": {"short": "Anna found a letter. It was from her mother.", "long": ["The mill burned.", "Tom came home.", "Winter came."]},
    "tasks": ["Write about 80 words", "Use dialogue"],
    "x-note": {"anything": [1, 2]},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("panels")
    convert(checkpoint_with_tokenizer(d / "hf", context=512), d / "m.ep",
            Recipe(planes=2, group=32, calib=None, scales="u8"))
    return load(d / "m.ep", threads=1)


# -- schema ---------------------------------------------------------------------------------
def test_every_field_round_trips():
    p = Panel.from_dict(FULL)
    assert p.to_dict() == FULL
    assert p.present() == ["characters", "places", "memory", "goals", "tasks", "plan", "latest"]
    assert p.characters[1] == Entity("Tom", "her brother") and p.memory.long[0] == "The mill burned."
    for f in schema.FIELDS:    # each field alone is a valid panel
        Panel.from_dict({f: FULL[f]})


@pytest.mark.parametrize("doc, message", [
    ({}, "empty"),
    ({"x-only": 1}, "none of the fields"),
    ({"latest": 5}, "latest: must be a string, got a number"),
    ({"characters": {"name": "a"}}, "characters: must be a list"),
    ({"characters": [{"name": "A", "description": "d"}, {"name": "B"}]}, "characters[1]: 'description' is missing"),
    ({"characters": [{"name": "", "description": "d"}]}, "characters[0].name"),
    ({"places": [{"name": "P", "description": "d", "size": 3}]}, "places[0].size: unknown field 'size'"),
    ({"goals": ["ok", 3]}, "goals[1]: must be a string"),
    ({"memory": {"short": "s", "medium": "m"}}, "memory.medium: unknown field 'medium'"),
    ({"memory": {"long": "not a list"}}, "memory.long: must be a list"),
    ({"plan": "p", "mood": "sad"}, "mood: unknown field 'mood' (free-form keys must start with 'x-')"),
    ([1, 2], "must be an object"),
])
def test_bad_panels_name_the_field(doc, message):
    with pytest.raises(PanelError, match=None) as e:
        Panel.from_dict(doc)
    assert message in str(e.value)


def test_errors_name_the_line_of_the_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{\n  "plan": "go",\n  "characters": [\n    {"name": "A", "description": "x"},\n'
                 '    {"name": 7, "description": "y"}\n  ]\n}\n')
    with pytest.raises(PanelError) as e:
        load_panel(f)
    assert str(e.value).startswith(f"{f}:5: characters[1].name: must be a string")
    f.write_text('{\n  "plan": "go",\n  "plan2": 1\n}')
    with pytest.raises(PanelError, match=r"p.json:3: plan2: unknown field"):
        load_panel(f)
    f.write_text('{\n  "plan": "go",\n  oops\n}')
    with pytest.raises(PanelError, match=r"p.json:3: not valid JSON"):
        load_panel(f)
    f.write_text("[" * 100000)
    with pytest.raises(PanelError, match="nested too deeply|not valid JSON"):
        load_panel(f)


def test_locate_finds_nested_values():
    text = '{"a": [1, {"b": {"c": [0, 0,\n 5]}}],\n "d": 2}'
    assert schema.locate(text, ["a", 1, "b", "c", 2]) == 2
    assert schema.locate(text, ["d"]) == 3 and schema.locate(text, []) == 1
    assert schema.locate(text, ["zz"]) is None


# -- rendering ------------------------------------------------------------------------------
def test_rendering_is_exact_and_deterministic(tiny):
    p = Panel.from_dict(FULL)
    r1, r2 = render(p, tiny.tokenizer), render(p, tiny.tokenizer)
    assert r1.text == r2.text and r1.ids == r2.ids and not r1.dropped and r1.chat
    assert r1.ids == tiny.tokenizer.encode(r1.text, add_special_tokens=False)
    b = body(p)
    assert r1.text == tiny.tokenizer.apply_chat_template([{"role": "user", "content": b}])
    # the layout: every value appears, in the documented order, the paragraph before last
    order = [b.index(s) for s in ("Anna: a miller's daughter", "Rosewood Hall", "The mill burned.", "Recently:",
                                  "Anna leaves", "Use dialogue", "Plan for this paragraph", "The paragraph before")]
    assert order == sorted(order)
    plain = render(p, tiny.tokenizer, chat=False)
    assert plain.text == b + "\n\nNext paragraph:\n" and not plain.chat


def test_budget_drops_in_the_documented_priority(tiny):
    p = Panel.from_dict(FULL)
    full = render(p, tiny.tokenizer)
    drops = []
    for budget in range(len(full.ids), 0, -1):
        try:
            r = render(p, tiny.tokenizer, budget)
        except PanelError as e:
            assert "every panel field dropped" in str(e)
            break
        assert len(r.ids) <= budget
        assert r.ids == tiny.tokenizer.encode(r.text, add_special_tokens=False)   # no cut inside a token
        drops = r.dropped
        for s in sentences(r.panel.latest or ""):   # whole sentences of the original only
            assert s in sentences(FULL["latest"])
    order = [u for u, _ in PRIORITY]
    units = [d.split("[")[0].split(":")[0] for d in drops]
    assert units == sorted(units, key=order.index), drops    # never a later unit before an earlier one
    assert drops[:3] == ["memory.long[0]", "memory.long[1]", "memory.long[2]"]
    assert "latest: sentence 1 of 3" in drops and drops.index("latest: sentence 1 of 3") < drops.index("plan: sentence 2 of 2")
    assert drops[-1] == "plan: sentence 1 of 2"
    # the end of the paragraph before (next to the new one) is the last of it to go
    assert [d for d in drops if d.startswith("latest")] == [f"latest: sentence {i} of 3" for i in (1, 2, 3)]


def test_sentences_keep_titles_and_quotes():
    assert sentences('"Dear Mr. Bennet," said she. "Have you heard?" Yes! Mrs. Long is here.') == [
        '"Dear Mr. Bennet," said she.', '"Have you heard?"', "Yes!", "Mrs. Long is here."]


# -- datasets and the loss mask -------------------------------------------------------------
def test_the_loss_mask_covers_the_target_only(tiny):
    ex_a = dataset.PanelExample(Panel.from_dict(FULL), "Tom said no. The mill stayed.")
    ex_b = dataset.PanelExample(Panel.from_dict({"plan": "something else entirely"}), ex_a.target)
    a, b = dataset.tokenize(ex_a, tiny.tokenizer, 512), dataset.tokenize(ex_b, tiny.tokenizer, 512)
    target = tiny.tokenizer.encode(ex_a.target, add_special_tokens=False)
    for t in (a, b):
        assert t.ids[t.mask].tolist() == target
        assert not t.mask[: len(t.rendered.ids)].any() and t.mask[len(t.rendered.ids):].all()
    assert a.ids[~a.mask].tolist() != b.ids[~b.mask].tolist()    # the panel changed the context only
    short = dataset.tokenize(ex_a, tiny.tokenizer, 90)
    assert len(short.ids) <= 90 and short.rendered.dropped
    assert short.ids[short.mask].tolist() == target


def test_dataset_lines_are_validated_with_line_numbers(tmp_path):
    good = json.dumps({"panel": {"plan": "p"}, "target": "t", "x-source": {"book": "b"}})
    f = tmp_path / "d.jsonl"
    f.write_text(good + "\n\n" + good + "\n")
    ex = dataset.load(f)
    assert len(ex) == 2 and ex[0].extra == {"x-source": {"book": "b"}} and ex[1].where == f"{f}:3"
    cases = [('{"panel": {"plan": 1}, "target": "t"}', "d.jsonl:2: panel.plan: must be a string"),
             ('{"panel": {"plan": "p"}}', "missing 'target'"),
             ('{"panel": {"plan": "p"}, "target": ""}', "'target' must be a non-empty string"),
             ('{"panel": {"plan": "p"}, "target": "t", "extra": 1}', "unknown field 'extra'"),
             ('{"panel": {"plan": "p"}, "target": "t"', "d.jsonl:2: not valid JSON"),
             ('[1]', "expected a JSON object")]
    for line, message in cases:
        f.write_text(good + "\n" + line + "\n")
        with pytest.raises(PanelError) as e:
            dataset.load(f)
        assert message in str(e.value), (line, str(e.value))
    g = tmp_path / "d.jsonl.gz"
    g.write_bytes(gzip.compress((good + "\n").encode()))
    assert dataset.load(g)[0].target == "t"
    g.write_bytes(b"not gzip")
    with pytest.raises(PanelError, match="cannot read"):
        dataset.load(g)


def test_shipped_datasets_validate():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for name, n in (("data/panels/austen-train.jsonl.gz", 3000), ("data/panels/austen-eval.jsonl.gz", 300),
                    ("tests/data/panels-small.jsonl", 12)):
        ex = dataset.load(root / name)
        assert len(ex) == n
        assert {"characters", "memory", "plan", "latest", "tasks"} <= {f for e in ex for f in e.panel.present()}
    train = {e.extra["x-source"]["book"] for e in dataset.load(root / "data/panels/austen-train.jsonl.gz")}
    held = {e.extra["x-source"]["book"] for e in dataset.load(root / "data/panels/austen-eval.jsonl.gz")}
    assert not train & held    # split by novel


# -- data built from books ------------------------------------------------------------------
BOOK = """THE MILL

Chapter 1

Anna Grey lived at Rosewood Hall with her father. "Good morning," said Anna to Mr. Pike.

Mr. Pike was the old miller of the village. He went to Rosewood Hall each day, and Anna liked him.

Chapter 2

"Where is the flour?" cried Mr. Pike. Anna did not know, and she said so. She walked to Rosewood Hall again in the cold evening.

Anna sat down. Mr. Pike sat beside Anna, and they spoke of the harvest and the rain at Rosewood Hall.
"""


def test_build_from_a_small_text(tmp_path):
    f = tmp_path / "mill.txt"
    f.write_text(BOOK)
    book = books.open_book(str(f))
    assert [p.chapter for p in book.paragraphs] == [1, 1, 2, 2]     # the title before chapter 1 is dropped
    names = build.find_names(book)
    assert {"Anna", "Mr. Pike"} <= names.persons and names.places == {"Rosewood Hall"}
    assert names.first["Mr. Pike"] == (0, '"Good morning," said Anna to Mr. Pike.')
    assert names.first["Anna"] == (0, "Anna Grey lived at Rosewood Hall with her father.")
    lines = list(build.build_lines(book, source="mill"))
    assert [ln["x-source"]["paragraph"] for ln in lines] == [1, 2, 3]
    last = Panel.from_dict(lines[-1]["panel"])
    assert last.latest == book.paragraphs[2].text
    assert [c.name for c in last.characters] == ["Anna", "Mr. Pike"]
    assert last.characters[0].description == "Anna Grey lived at Rosewood Hall with her father."
    assert [p.name for p in last.places] == ["Rosewood Hall"]
    assert last.memory.long == ("Chapter 1: Anna Grey lived at Rosewood Hall with her father.",)
    assert "harvest" in last.plan and "Mr. Pike" in last.plan
    assert last.tasks == ("Write paragraph 2 of chapter 2 of mill, about 20 words, narration.",)
    assert list(build.build_lines(book, source="mill")) == lines            # deterministic
    assert build.choose_targets(book, 2, seed=0) == build.choose_targets(book, 2, seed=0)


def _lazy_load_db(root, novels: dict):
    """A janeaustenr-style lazy-load database: Rdata.rdx (index) and Rdata.rdb (objects)."""
    import rdata

    def serialized(obj, tmp):
        rdata.write_rds(tmp, obj, compression=None)
        return tmp.read_bytes()

    rdb, index = b"", {}
    for name, lines in novels.items():
        raw = serialized(np.array(lines, dtype=object), root / "tmp.rds")
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = np.array([len(rdb), len(blob)], np.int32)
        rdb += blob
    (root / "Rdata.rdb").write_bytes(rdb)
    idx = serialized({"variables": index, "references": {}, "compressed": np.array([True])}, root / "tmp.rds")
    (root / "Rdata.rdx").write_bytes(gzip.compress(idx))


def test_janeaustenr_reader(tmp_path):
    _lazy_load_db(tmp_path, {"emma": BOOK.splitlines(), "persuasion": ["Chapter 1", "", "One line.", "", "Two."]})
    emma = books.janeaustenr("emma", tmp_path)
    assert emma.title == "Emma" and emma.paragraphs[0].text.startswith("Anna Grey lived")
    assert [p.text for p in books.janeaustenr("persuasion", tmp_path).paragraphs] == ["One line.", "Two."]
    with pytest.raises(PanelError, match="no Austen novel"):
        books.janeaustenr("dracula", tmp_path)
    with pytest.raises(PanelError, match="has no 'mansfieldpark'"):
        books.janeaustenr("mansfieldpark", tmp_path)
    (tmp_path / "Rdata.rdb").write_bytes(b"\0\0\0\x10garbage" * 4)
    with pytest.raises(PanelError, match="does not decompress"):
        books.janeaustenr("emma", tmp_path)
    with pytest.raises(PanelError, match="not there"):
        books.janeaustenr("emma", tmp_path / "nowhere")


# -- evaluation -----------------------------------------------------------------------------
def test_eval_equals_a_float64_hand_computation(tiny):
    ex = dataset.load(__import__("pathlib").Path(__file__).parent / "data" / "panels-small.jsonl")[:3]
    res = evaluate(tiny, ex, ["full", "none", "-plan"], seq_len=160, progress=False)
    for cond in ("full", "none", "-plan"):
        losses, hits, ents = [], [], []
        for e in ex:
            t = dataset.tokenize(e, tiny.tokenizer, 160, cond)
            z = tiny.logits(t.ids).astype(np.float64)[:-1][t.mask[1:]]      # one full pass, no cache
            y = t.ids[1:][t.mask[1:]]
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            losses += list(-np.log(p[np.arange(len(y)), y]))
            hits += list(z.argmax(1) == y)
            ents += list(-(p * np.log(p)).sum(1))
        got = res["conditions"][cond]
        assert got["loss"] == pytest.approx(np.mean(losses), rel=1e-4)
        assert got["accuracy"] == pytest.approx(np.mean(hits), abs=1e-9)
        assert got["entropy"] == pytest.approx(np.mean(ents), rel=1e-4)
    assert res["examples"] == 3 and res["tokens"] == len(losses)
    assert res["conditions"]["full"]["loss"] != res["conditions"]["none"]["loss"]


def test_token_stats_small_case():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], np.float32))
    loss, correct, ent = token_stats(logits, np.array([1, 2]))
    assert np.allclose(loss, [np.log(4), -np.log(0.8)])
    assert correct.tolist() == [False, True]
    assert np.allclose(ent, [1.5 * np.log(2), -(0.2 * np.log(0.1) + 0.8 * np.log(0.8))])


# -- the story loop -------------------------------------------------------------------------
@pytest.mark.skipif(native.lib is None, reason="C kernels not built")
def test_story_writes_valid_lines_and_resumes(tiny, tmp_path):
    start = Panel.from_dict({"plan": "the cat sat on the mat", "characters": [{"name": "Tom", "description": "a cat"}]})
    kw = dict(max_tokens=12, seed=3)
    whole = write_story(tiny, start, 3, tmp_path / "whole.jsonl", **kw)
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    assert len(lines) == 3 and [s.index for s in whole] == [0, 1, 2]
    for ln in lines:
        obj = json.loads(ln)
        Panel.from_dict(obj["panel"])
        Panel.from_dict(obj["next_panel"])
    assert json.loads(lines[1])["panel"] == json.loads(lines[0])["next_panel"]
    assert json.loads(lines[1])["panel"]["latest"] == json.loads(lines[0])["paragraph"] or not json.loads(lines[0])["paragraph"]
    part = tmp_path / "part.jsonl"
    write_story(tiny, start, 2, part, **kw)
    with open(part, "a") as f:
        f.write('{"index": 2, "paragr')                    # a write cut off by a kill
    assert resume_point(part)[0] == 2
    write_story(tiny, None, 3, part, resume=True, **kw)
    assert part.read_text().splitlines() == lines          # as if never interrupted
    with pytest.raises(PanelError, match="exists"):
        write_story(tiny, start, 1, part)


def test_character_updates_are_parsed_and_checked():
    known = {"Tom"}
    got = parse_characters("- Anna Grey: a miller's daughter\nTom: again\nnone\nlowercase: x\n3. Bob:  \n"
                           "Mr. Pike: the miller", known)
    assert got == [Entity("Anna Grey", "a miller's daughter"), Entity("Mr. Pike", "the miller")]


# -- the command line -----------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"panel": {"plan": "p"}, "target": "t"}\n{"panel": {"tasks": "x"}, "target": "t"}\n')
    assert main(["data", "validate", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"edgepanel: {bad}:2: panel.tasks: must be a list, got a string"
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    assert main(["data", "build", str(tmp_path / "missing.txt"), "--out", str(out)]) == 1
    assert "cannot read the book" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"                  # nothing already written is lost
    assert main(["data", "build", "austen:nope", "--out", str(out), "--limit", "0"]) == 1
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_cli_data_build_validate_show_eval(tiny, tmp_path, capsys):
    f = tmp_path / "mill.txt"
    f.write_text(BOOK)
    out = tmp_path / "mill.jsonl.gz"
    assert main(["data", "build", str(f), "--out", str(out), "-q"]) == 0
    first = out.read_bytes()
    assert main(["data", "build", str(f), "--out", str(out), "-q"]) == 0 and out.read_bytes() == first
    assert main(["data", "validate", str(out)]) == 0
    assert "3 valid examples" in capsys.readouterr().out
    assert main(["data", "show", str(out), "2", "--model", str(tiny.path), "--seq-len", "400"]) == 0
    shown = capsys.readouterr().out
    assert "Plan for this paragraph" in shown and "prompt tokens" in shown
    js = tmp_path / "r.json"
    assert main(["eval", str(tiny.path), "--data", str(out), "--json", str(js), "--seq-len", "300", "-q"]) == 0
    r = json.loads(js.read_text())
    assert r["examples"] == 3 and r["tokens"] > 0
    assert {"full", "none", "-plan", "-latest", "-characters"} <= set(r["conditions"])
    assert all(set(v) >= {"loss", "accuracy", "entropy"} for v in r["conditions"].values())
    assert main(["eval", str(tiny.path), "--data", str(out), "--conditions", "full,-mood"]) == 1
    assert "unknown condition" in capsys.readouterr().err


def test_the_trainer_reads_panel_datasets(tiny):
    from pathlib import Path

    from edgepanel.tune import data
    f = Path(__file__).parent / "data" / "panels-small.jsonl"
    ex = dataset.load(f)
    for cond in ("full", "none"):
        got = data.load(f, tiny.tokenizer, 200, cond)
        assert len(got) == len(ex)
        for g, e in zip(got, ex):
            t = dataset.tokenize(e, tiny.tokenizer, 200, cond)
            assert g.ids.tolist() == t.ids.tolist() and g.mask.tolist() == t.mask.tolist()
    full, none = data.load(f, tiny.tokenizer, 500), data.load(f, tiny.tokenizer, 500, "none")
    assert [a.ids[a.mask].tolist() for a in full] == [b.ids[b.mask].tolist() for b in none]   # same targets
    assert all(len(a.ids) > len(b.ids) for a, b in zip(full, none))


def test_build_with_a_model_writing_summaries(tiny, tmp_path):
    book = books.from_lines("mill", BOOK.splitlines())
    summarizer = build.ModelSummarizer(tiny, max_tokens=8)
    lines = list(build.build_lines(book, summarizer=summarizer, source="mill"))
    assert lines == list(build.build_lines(book, summarizer=build.ModelSummarizer(tiny, max_tokens=8), source="mill"))
    last = Panel.from_dict(lines[-1]["panel"])
    expected_plan = " ".join(tiny.generate([{"role": "user", "content": build.prompts()["plan"].format(
        text=book.paragraphs[3].text)}], max_tokens=8, temperature=0.0).split()) or "(nothing)"
    assert last.plan == expected_plan                   # the model's words, from the prompt in prompts.json
    assert last.memory.long and not last.memory.long[0].startswith("Chapter 1: Anna")
