"""Fuzz the GGUF reader: any bytes given as a .gguf source either convert into a model that
loads and runs, or stop with an edgepanel error naming the problem."""
import atheris

from common import main, mutate_header_ints, scratch

with atheris.instrument_imports(include=["edgepanel"]):
    import edgepanel
    from edgepanel.convert import Recipe, convert, open_checked
    from edgepanel.errors import EdgepanelError


def test_one_input(data: bytes):
    src = scratch("source.gguf")
    src.write_bytes(data)
    try:
        for _ in open_checked(src)[3]:   # every tensor read and checked against the config
            pass
        convert(src, scratch("out.ep"), Recipe(planes=1, group=0, calib=None))
    except EdgepanelError:
        return
    m = edgepanel.load(scratch("out.ep"), threads=1)   # what converts must load and run
    try:
        m.generate_ids([0], max_tokens=1, temperature=0)
    except FloatingPointError:
        pass   # finite but huge weights overflow: the engine's "non-finite logits" error


if __name__ == "__main__":
    main(test_one_input, mutate_header_ints)
