"""`info`: the kernels and machine, and what a model file holds."""
from __future__ import annotations

import platform


def cmd_info(a) -> int:
    from .. import __version__, hub, kernels
    from ..kernels import native

    print(f"edgepanel {__version__} on {platform.machine()} ({platform.system()}), Python {platform.python_version()}")
    print(f"kernels:   {kernels.info()}")
    print(f"compiled:  {', '.join(native.compiled_isas()) or 'none (C extension not built)'}")
    print(f"runnable:  {', '.join(b if i is None else f'{b}/{i}' for b, i in kernels.available())}")
    if native.lib is not None:
        print(f"cpus:      {native.lib.ep_cpu_count()}")
    if a.model:
        from ..format import ModelFile
        path = hub.resolve_model(a.model)
        f = ModelFile(path)
        c, kinds = f.meta.config, {}
        for r in f.meta.tensors.values():
            key = r["kind"] + (f" k={r['k']} g={r['group']}" if r["kind"] == "planes" else "")
            kinds[key] = kinds.get(key, 0) + 1
        print(f"model:     {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        print(f"           {f.meta.architecture}: {c['n_layers']} layers, dim {c['dim']}, heads {c['n_heads']}/"
              f"{c['n_kv_heads']}, MLP {c['hidden_dim']}, vocab {c['vocab_size']}, context {c['max_seq_len']}")
        print(f"tensors:   {', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}")
        print(f"source:    {f.meta.source.get('path')} ({f.meta.source.get('architecture')})")
        print(f"tokenizer: {'yes' if f.tokenizer_json else 'none (token ids only)'}; chat template: "
              f"{'yes' if f.meta.tokenizer.get('chat_template') else 'no'}")
        for h in f.meta.history:
            print(f"history:   {h}")
    return 0


def register(sub):
    s = sub.add_parser("info", help="kernels, machine, and optionally a model")
    s.add_argument("model", nargs="?")
    s.set_defaults(func=cmd_info)
