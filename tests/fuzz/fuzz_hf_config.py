"""Fuzz the Hugging Face config reader: any config.json beside the tiny checkpoint's tensors
either converts into a model that loads and runs, or stops with an edgepanel error naming the
file and field."""
import atheris

from common import main, mutate_json_bytes, scratch
from seeds import hf_checkpoint

with atheris.instrument_imports(include=["edgepanel"]):
    import edgepanel
    from edgepanel.convert import Recipe, convert, open_checked
    from edgepanel.errors import EdgepanelError

CHECKPOINT = hf_checkpoint(scratch("hf"))


def test_one_input(data: bytes):
    (CHECKPOINT / "config.json").write_bytes(data)
    try:
        for _ in open_checked(CHECKPOINT)[3]:
            pass
        convert(CHECKPOINT, scratch("out.ep"), Recipe(planes=1, group=0, calib=None))
    except EdgepanelError:
        return
    m = edgepanel.load(scratch("out.ep"), threads=1)
    try:
        m.generate_ids([0], max_tokens=1, temperature=0)
    except FloatingPointError:
        pass


if __name__ == "__main__":
    main(test_one_input, mutate_json_bytes)
