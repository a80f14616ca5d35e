"""Fuzz the model-file reader: any bytes given to edgepanel.load are a model that runs (a forward
pass, a score) or an edgepanel error; never a crash, a hang, a signal or another exception."""
import atheris

from common import main, mutate_safetensors, scratch

with atheris.instrument_imports(include=["edgepanel"]):
    import edgepanel
    import edgepanel.model.cengine  # noqa: F401  (load imports these lazily: instrument them now)
    import edgepanel.model.engine  # noqa: F401
    import edgepanel.model.model  # noqa: F401
    from edgepanel.errors import EdgepanelError


def test_one_input(data: bytes):
    path = scratch("model.ep")
    path.write_bytes(data)
    try:
        m = edgepanel.load(path, threads=1)
    except EdgepanelError:
        return
    try:
        m.generate_ids([0, 1], max_tokens=2, temperature=0)
        m.score([[0, 1, 2]])
        if m.tokenizer.available and m.tokenizer.chat_template:
            m.generate([{"role": "user", "content": "a"}], max_tokens=1)
    except EdgepanelError:
        pass
    except FloatingPointError:
        pass   # finite but huge parameters overflow: the engine's "non-finite logits" error


if __name__ == "__main__":
    main(test_one_input, mutate_safetensors)
