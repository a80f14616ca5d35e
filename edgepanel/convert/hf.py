"""Reading a local Hugging Face checkpoint directory: config.json, *.safetensors (sharded or not),
tokenizer.json, tokenizer_config.json, generation_config.json.  Never loads pickles."""
from __future__ import annotations

from pathlib import Path

from ..errors import FormatError
from ..format import SafetensorsFile, parse_json
from ..tokenizer import check_tokenizer_info
from .base import SourceTensors

PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt", "tf_model.h5",
           "flax_model.msgpack")


def read_json(path: Path, required: bool = True):
    if not path.exists():
        if required:
            raise FormatError(f"{path}: missing")
        return None
    return parse_json(_read_text(path), str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None


def read_object(path: Path, required: bool = True) -> dict | None:
    """read_json of a file that must hold a JSON object (config.json and its kin)."""
    d = read_json(path, required)
    if d is not None and not isinstance(d, dict):
        raise FormatError(f"{path}: not a JSON object")
    return d


def open_weights(d: Path) -> SourceTensors:
    index = d / "model.safetensors.index.json"
    if index.exists():
        idx = read_json(index)
        wmap = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise FormatError(f"{index}: no weight_map")
        files = {}
        if not all(isinstance(v, str) for v in wmap.values()):
            raise FormatError(f"{index}: weight_map values must be file names")
        for shard in sorted(set(wmap.values())):
            p = d / shard
            if p.resolve().parent != d.resolve():
                raise FormatError(f"{index}: shard {shard!r} is not a file of {d}")
            if not p.exists():
                raise FormatError(f"{index}: shard {shard} is missing")
            files[shard] = SafetensorsFile(p)
        names = {}
        for name, shard in wmap.items():
            if name not in files[shard].tensors:
                raise FormatError(f"{d / shard}: tensor '{name}' listed in the index is not in the shard")
            names[name] = files[shard]
        for shard, f in files.items():  # tensors a shard holds but the index forgot still count
            for name in f.tensors:
                names.setdefault(name, f)
        return SourceTensors(list(names), lambda n: names[n].float32(n) if n in names[n].bf16 else names[n].tensors[n], str(d))
    single = sorted(d.glob("*.safetensors"))
    if len(single) == 1:
        f = SafetensorsFile(single[0])
        return SourceTensors(list(f.tensors), lambda n: f.float32(n) if n in f.bf16 else f.tensors[n], str(single[0]))
    if len(single) > 1:
        raise FormatError(f"{d}: several .safetensors files but no model.safetensors.index.json")
    pickles = [p for p in PICKLES if (d / p).exists()]
    if pickles:
        raise FormatError(f"{d}: only {pickles[0]} is present; edgepanel never loads pickled checkpoints. "
                          "Save the model with safetensors (model.save_pretrained(dir, safe_serialization=True)).")
    raise FormatError(f"{d}: no *.safetensors weights found")


def tokenizer_info(d: Path) -> tuple[str | None, dict]:
    """(tokenizer.json text or None, special tokens / chat template / generation defaults)."""
    tok_path = d / "tokenizer.json"
    tok_json = _read_text(tok_path) if tok_path.exists() else None
    tc = read_object(d / "tokenizer_config.json", required=False) or {}
    gc = read_object(d / "generation_config.json", required=False) or {}
    cfg = read_object(d / "config.json") or {}
    template = tc.get("chat_template")
    if (d / "chat_template.jinja").exists():
        template = _read_text(d / "chat_template.jinja")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    vocab = {}
    if tok_json:
        tj = parse_json(tok_json, str(tok_path))
        model = tj.get("model") if isinstance(tj, dict) else None
        if not isinstance(model, dict):
            raise FormatError(f"{tok_path}: no 'model' object")
        vocab = dict(model["vocab"]) if isinstance(model.get("vocab"), dict) else {}
        for t in tj.get("added_tokens") or []:
            if isinstance(t, dict) and isinstance(t.get("content"), str):
                vocab[t["content"]] = t.get("id")

    def tok_id(v):
        if isinstance(v, dict):
            v = v.get("content")
        return vocab.get(v) if isinstance(v, str) else None

    eos = gc.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list) else []
    if not eos_ids and tok_id(tc.get("eos_token")) is not None:
        eos_ids = [tok_id(tc.get("eos_token"))]
    bos = gc.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is None:
        bos = tok_id(tc.get("bos_token"))
    info = {
        "bos_id": bos, "eos_ids": eos_ids, "add_bos": tc.get("add_bos_token", False) is True,
        "chat_template": template, "bos_token": _content(tc.get("bos_token")),
        "eos_token": _content(tc.get("eos_token")),
        "generation": {k: gc[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in gc},
    }
    return tok_json, check_tokenizer_info(info, str(d))


def _content(v):
    v = v.get("content") if isinstance(v, dict) else v
    return v if isinstance(v, str) else None


def open_hf(d: Path):
    """(HF architecture name, config dict, SourceTensors, tokenizer json, tokenizer info)."""
    cfg = read_object(d / "config.json")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise FormatError(f"{d / 'config.json'}: 'architectures' must be a non-empty list of names, got {archs!r:.80}")
    from .base import architecture_for
    architecture_for(archs[0])  # an unsupported architecture fails before any weight is read
    tok_json, info = tokenizer_info(d)
    return archs[0], cfg, open_weights(d), tok_json, info
