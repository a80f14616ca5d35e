"""The held-out texts perplexity is reported on (never used for calibration):

  verse: the "songs-poems" file of Debian's `fortunes` package (poems and song lyrics),
         fetched with `apt-get download fortunes` and cached; fortune separators removed;
  prose: the GNU GPL version 3, /usr/share/common-licenses/GPL-3 on Debian systems;
  technical: the Python language reference's help topics (pydoc_data.topics, shipped with
         CPython; these figures: Python 3.11), in sorted order.

    python tools/eval_texts.py          # prints where they are and how long
"""
from __future__ import annotations

import glob
import os
import subprocess
import tempfile
from pathlib import Path

from edgepanel.hub import cache_dir


def verse() -> str:
    dest = cache_dir() / "eval" / "songs-poems.txt"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "fortunes"], cwd=tmp, check=True, capture_output=True)
            deb = glob.glob(os.path.join(tmp, "fortunes_*.deb"))[0]
            subprocess.run(["dpkg", "-x", deb, os.path.join(tmp, "x")], check=True)
            raw = Path(tmp, "x/usr/share/games/fortunes/songs-poems").read_text(encoding="utf-8", errors="replace")
        text = "\n\n".join(p.strip("\n") for p in raw.split("\n%\n") if p.strip())
        dest.write_text(text, encoding="utf-8")
    return dest.read_text(encoding="utf-8")


def prose() -> str:
    return Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")


def technical() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


TEXTS = {"verse": verse, "prose": prose, "technical": technical}

if __name__ == "__main__":
    for name, fn in TEXTS.items():
        t = fn()
        print(f"{name}: {len(t)} characters")
