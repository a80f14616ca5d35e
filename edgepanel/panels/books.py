"""Books as chapters of paragraphs: from plain text files, or from the six Jane Austen novels in
Debian's `r-cran-janeaustenr` package (public domain), whose data is an R lazy-load database:
`Rdata.rdx` (a gzip-compressed, serialized R list of name -> (offset, length)) and `Rdata.rdb` (at
each offset a 4-byte big-endian length, then a zlib-compressed serialized R object; here a
character vector of the book's lines).  The serialized objects are read with `rdata`, a maintained
Python reader of R's formats (the `panels` extra); nothing is executed.
"""
from __future__ import annotations

import gzip
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from .schema import PanelError

JANEAUSTENR = Path("/usr/lib/R/site-library/janeaustenr/data")
AUSTEN = {  # the package's names -> titles
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\b\.?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Paragraph:
    text: str
    chapter: int        # 1-based; 0 before the first chapter heading
    index: int          # position in the book, 0-based


@dataclass(frozen=True)
class Book:
    title: str
    paragraphs: tuple[Paragraph, ...]


def from_lines(title: str, lines) -> Book:
    """Paragraphs are runs of non-empty lines; chapter headings start chapters; text before the
    first heading (title page, contents) is dropped when the book has headings.  Underscores
    (italics in Project Gutenberg texts) are removed."""
    paras, cur, chapter, seen_heading = [], [], 0, False

    def flush():
        if cur:
            text = re.sub(r"\s+", " ", " ".join(cur)).replace("_", "").strip()
            if text and (seen_heading or not has_headings):
                paras.append(Paragraph(text, chapter, len(paras)))
            cur.clear()

    lines = [str(x) for x in lines]
    has_headings = any(_CHAPTER.match(x) for x in lines)
    for line in lines:
        if _CHAPTER.match(line):
            flush()
            chapter += 1
            seen_heading = True
        elif line.strip():
            cur.append(line.strip())
        else:
            flush()
    flush()
    if not paras:
        raise PanelError(f"{title}: no paragraphs found")
    return Book(title, tuple(paras))


def _rdb_object(rdb: bytes, offset: int, length: int, where: str):
    import rdata
    blob = rdb[offset:offset + length]
    if len(blob) < 5:
        raise PanelError(f"{where}: entry at {offset} is truncated")
    size = struct.unpack(">I", blob[:4])[0]
    try:
        data = zlib.decompress(blob[4:])
    except zlib.error as exc:
        raise PanelError(f"{where}: entry at {offset} does not decompress ({exc})") from None
    if len(data) != size:
        raise PanelError(f"{where}: entry at {offset} is {len(data)} bytes, its header says {size}")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # rdata warns that a bare serialized object "assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def janeaustenr(name: str, root: Path = JANEAUSTENR) -> Book:
    """One novel from the janeaustenr lazy-load database (`name` as in AUSTEN)."""
    if name not in AUSTEN:
        raise PanelError(f"no Austen novel {name!r}; known: {', '.join(AUSTEN)}")
    try:
        import rdata  # noqa: F401
    except ImportError:
        raise PanelError("reading janeaustenr needs the rdata package: pip install 'edgepanel[panels]'") from None
    rdx, rdb = root / "Rdata.rdx", root / "Rdata.rdb"
    if not rdx.is_file() or not rdb.is_file():
        raise PanelError(f"{root}: the janeaustenr data is not there (apt-get install r-cran-janeaustenr)")
    import warnings
    import rdata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes())))
    entries = {str(k): v for k, v in index["variables"].items()}
    if name not in entries:
        raise PanelError(f"{rdx}: has no {name!r}")
    off, length = (int(x) for x in entries[name])
    lines = _rdb_object(rdb.read_bytes(), off, length, str(rdb))
    return from_lines(AUSTEN[name], list(lines))


def open_book(spec: str) -> Book:
    """`austen:NAME` (janeaustenr) or a UTF-8 text file."""
    if spec.startswith("austen:"):
        return janeaustenr(spec.split(":", 1)[1])
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PanelError(f"{path}: cannot read the book ({exc})") from None
    return from_lines(path.stem, text.splitlines())
