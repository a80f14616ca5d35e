"""The edgepanel model file: a safetensors container, the only place its layout is defined.

A model file is a standard safetensors file (readable by the `safetensors` library):
  8 bytes   little-endian u64 N: length of the JSON header
  N bytes   JSON header: {tensor name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
            "__metadata__": {"edgepanel": <JSON text>, "tokenizer.json": <JSON text>}}
            padded with spaces so the data starts on an 8-byte boundary
  data      the tensors back to back, ordered by element size, largest first (8-byte types, then
            4, 2, 1: ModelWriter), so every tensor is aligned to its element size

The "edgepanel" metadata (see `Metadata`) carries the format version, the architecture and its
hyper-parameters, the recipe of every tensor, the tokenizer's special tokens and chat template.
Loading maps the file read-only: tensors are NumPy views into the mapping, never copied.  A model
loaded to run may then read the tensors a decode step streams into memory backed by 2 MiB pages
(`SafetensorsFile.read_into_memory`), those tensors then views of that copy.

Tensor names and kinds (per linear layer NAME, see model/weights.py for the names):
  NAME.planes  uint8 (k, out_pad/16, in_pad/8, 16)   binary planes, layout in edgepanel/bits.py
  NAME.scales  float16 (k, out_pad/16, n_groups, 16) (float32 also read), or uint8 codes with
  NAME.scale_rows float32 (out_pad/16, 16)           (8-bit scales, see edgepanel/bits.py)
  NAME.weight  float32 or float16 (out, in)          a dense (unbinarized) linear layer
  NAME.q       int8 (rows, cols) + NAME.row_scale float32 (rows,)   int8 rows (embeddings, head)
  NAME.bias    float32 (out,)
Every reading error is an edgepanel.FormatError naming the file and what is wrong.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FormatError

FORMAT_NAME = "edgepanel"
FORMAT_VERSION = 1
META_KEY = "edgepanel"
TOKENIZER_KEY = "tokenizer.json"
MAX_HEADER = 256 * 2**20
HUGE_PAGE = 2 * 2**20
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

DTYPES = {  # safetensors name -> numpy dtype (little-endian)
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Metadata:
    """What the "edgepanel" metadata entry holds."""

    architecture: str
    config: dict
    tensors: dict                      # tensor group name -> recipe dict ({"kind": ...})
    tokenizer: dict = field(default_factory=dict)   # special tokens, chat template, ...
    source: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)      # the conversion options, for the record
    history: list = field(default_factory=list)     # what changed the file since (fine-tuning runs, ...)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_NAME, "format_version": self.format_version,
                           "architecture": self.architecture, "config": self.config,
                           "tensors": self.tensors, "tokenizer": self.tokenizer,
                           "source": self.source, "recipe": self.recipe,
                           **({"history": self.history} if self.history else {})}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Metadata":
        if not isinstance(text, str):
            raise FormatError(f"{where}: __metadata__.{META_KEY} must be a string of JSON, got {type(text).__name__}")
        d = parse_json(text, f"{where}: the edgepanel metadata")
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not an edgepanel model (metadata 'format' is {d.get('format') if isinstance(d, dict) else d!r})")
        version = d.get("format_version")
        if not isinstance(version, int):
            raise FormatError(f"{where}: metadata has no integer format_version")
        if version > FORMAT_VERSION:
            raise FormatError(f"{where}: format version {version} is newer than this edgepanel reads "
                              f"(up to {FORMAT_VERSION}); upgrade edgepanel")
        if version < 1:
            raise FormatError(f"{where}: unknown format version {version}")
        for key, typ in (("architecture", str), ("config", dict), ("tensors", dict)):
            if not isinstance(d.get(key), typ):
                raise FormatError(f"{where}: metadata field '{key}' is missing or not a {typ.__name__}")
        for key, typ in (("tokenizer", dict), ("source", dict), ("recipe", dict), ("history", list)):
            if d.get(key) is not None and not isinstance(d[key], typ):
                raise FormatError(f"{where}: metadata field '{key}' must be a JSON {'object' if typ is dict else 'array'}, "
                                  f"got {type(d[key]).__name__}")
        return cls(architecture=d["architecture"], config=d["config"], tensors=d["tensors"],
                   tokenizer=d.get("tokenizer") or {}, source=d.get("source") or {},
                   recipe=d.get("recipe") or {}, history=d.get("history") or [], format_version=version)


def parse_json(text, what: str):
    """json.loads with every failure a FormatError naming `what` (nesting too deep for the parser
    raises RecursionError, not ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError, TypeError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise FormatError(f"{what} is not valid JSON ({why})") from None


# ---------------------------------------------------------------------------------------------
# reading


def huge_pages() -> bool:
    """Whether memory advised with MADV_HUGEPAGE gets transparent huge pages here (Linux, with the
    setting at "always" or "madvise", as most distributions ship it)."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


class SafetensorsFile:
    """Any safetensors file, mapped read-only: `tensors[name]` are NumPy views (BF16 tensors come
    as uint16 arrays, named in `bf16`), `metadata` the str->str metadata.  Malformed files raise
    FormatError naming the file and the problem."""

    def __init__(self, path):
        self.path = Path(path)
        self.copied: set[str] = set()   # tensors read into memory (read_into_memory)
        self._copies: list[mmap.mmap] = []
        where = str(self.path)
        try:   # before open(): opening a FIFO would block until a writer comes
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                raise FormatError(f"{where}: not a regular file")
            f = open(self.path, "rb")
        except OSError as exc:
            raise FormatError(f"{where}: cannot open ({exc.strerror})") from None
        # The file stays open: `changed()` compares its size and mtime with these (a file
        # rewritten in place under the mapping would give SIGBUS or other weights).
        self._file = f
        self._stat = os.fstat(f.fileno())
        try:
            self._read(where)
        except BaseException:
            self._close_file()
            raise

    def _read(self, where: str):
        f, size = self._file, self._stat.st_size
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{where}: file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:   # checked before anything is mapped or read
            raise FormatError(f"{where}: header length {n} does not fit the {size}-byte file (truncated or not safetensors)")
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            text = bytes(self._mm[8:8 + n]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{where}: header is not valid JSON ({exc})") from None
        header = parse_json(text, f"{where}: header")
        if not isinstance(header, dict):
            raise FormatError(f"{where}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{where}: __metadata__ is not a JSON object")
        self.metadata: dict = meta
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors: dict[str, np.ndarray] = {}
        self._span: dict[str, tuple[int, int]] = {}   # name -> (offset in the file, bytes)
        self.bf16: set[str] = set()
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict):
                raise FormatError(f"{where}: tensor '{name}' has no description")
            dtn = info.get("dtype")
            dt = np.dtype("<u2") if dtn == "BF16" else DTYPES.get(dtn) if isinstance(dtn, str) else None
            shape = info.get("shape")
            offs = info.get("data_offsets")
            if dt is None:
                raise FormatError(f"{where}: tensor '{name}' has unsupported dtype {dtn!r}")
            if not (isinstance(shape, list) and all(_is_int(s) and 0 <= s < 2**62 for s in shape)):
                raise FormatError(f"{where}: tensor '{name}' has an invalid shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
                raise FormatError(f"{where}: tensor '{name}' has invalid data_offsets {offs!r}")
            b, e = offs
            count = math.prod(shape)   # Python integers: a declared 2^64 cannot overflow
            if not 0 <= b <= e or e - b != count * dt.itemsize:
                raise FormatError(f"{where}: tensor '{name}' offsets {offs} do not match shape {shape} of {dtn}")
            if e > data_len:
                raise FormatError(f"{where}: tensor '{name}' ends at byte {e} past the {data_len} data bytes (the file is truncated)")
            try:
                if (data_start + b) % dt.itemsize:
                    # foreign files need not align; copy such a tensor rather than misread it
                    arr = np.frombuffer(bytes(self._mm[data_start + b:data_start + e]), dtype=dt).reshape(shape)
                else:
                    arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=data_start + b).reshape(shape)
            except ValueError as exc:   # e.g. (0, 2^61): no bytes, but a shape NumPy cannot hold
                raise FormatError(f"{where}: tensor '{name}' has shape {shape}, which NumPy cannot hold ({exc})") from None
            self.tensors[name] = arr
            self._span[name] = (data_start + b, e - b)
            if dtn == "BF16":
                self.bf16.add(name)
            spans.append((b, e, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise FormatError(f"{where}: tensors '{n0}' and '{n1}' overlap")

    def float32(self, name: str) -> np.ndarray:
        """Tensor `name` converted to float32 (BF16 widened exactly)."""
        a = self.tensors[name]
        if name in self.bf16:
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def read_into_memory(self, names=None) -> int:
        """Tensors `names` (None: every one) read from the file into one block of private memory
        advised for transparent huge pages, starting on a 2 MiB boundary, each 64-byte aligned;
        `tensors[name]` then a read-only view of it.  Returns the bytes read.

        Why: a decode step streams every weight once, and on 4 KiB pages (how a file mapping
        comes) every page costs a TLB miss and the core's hardware prefetchers stop at each page
        boundary.  In 2 MiB pages the default model decoded 1.07-1.20x faster (docs/bench.md,
        "A 2-core AMD EPYC Zen 4").  Read with read(), not copied through the mapping: the page cache's copy
        never counts in this process's resident memory."""
        plan, size = [], 0
        for name in sorted(self.tensors if names is None else names, key=lambda n: self._span[n][0]):
            off, nbytes = self._span[name]
            if nbytes and name not in self.copied:
                plan.append((name, off, nbytes, size))
                size += -(-nbytes // 64) * 64
        if not plan:
            return 0
        private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)   # 0: not POSIX
        buf = mmap.mmap(-1, size + HUGE_PAGE, **({"flags": private} if private else {}))
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)
        probe = np.frombuffer(buf, np.uint8, count=1)
        at = -probe.ctypes.data % HUGE_PAGE
        del probe
        with memoryview(buf) as whole:
            for name, off, nbytes, pos in plan:
                with whole[at + pos:at + pos + nbytes] as view:
                    self._file.seek(off)
                    got = 0
                    while got < nbytes:
                        n = self._file.readinto(view[got:])
                        if not n:
                            raise FormatError(f"{self.path}: the file ended inside tensor '{name}' while it was read "
                                              f"(truncated since it was opened)")
                        got += n
        for name, off, nbytes, pos in plan:
            a = self.tensors[name]
            arr = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=at + pos).reshape(a.shape)
            arr.flags.writeable = False   # as the mapping's views
            self.tensors[name] = arr
            self.copied.add(name)
        self._copies.append(buf)
        return size

    def changed(self) -> str | None:
        """What changed in the file since it was mapped (size, modification time), or None.  A
        file replaced by rename (as edgepanel writes) keeps the mapped one intact: not a change."""
        try:
            now = os.fstat(self._file.fileno())
        except (OSError, ValueError):
            return "it was closed"
        if now.st_size != self._stat.st_size:
            return f"its size went from {self._stat.st_size} to {now.st_size} bytes"
        if now.st_mtime_ns != self._stat.st_mtime_ns:
            return "it was modified"
        return None

    def _close_file(self):
        try:
            self._file.close()
        except OSError:
            pass

    def close(self):
        self.tensors = {}
        self._close_file()
        try:
            self._mm.close()
        except BufferError:  # views still alive: the mapping goes when they do
            pass


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class ModelFile(SafetensorsFile):
    """A mapped edgepanel model file: tensors, `meta` (Metadata) and `tokenizer_json` (or None)."""

    def __init__(self, path):
        super().__init__(path)
        where = str(self.path)
        if META_KEY not in self.metadata:
            raise FormatError(f"{where}: no edgepanel metadata (is this a plain safetensors file? convert it with `edgepanel convert`)")
        self.meta = Metadata.from_json(self.metadata[META_KEY], where)
        tok = self.metadata.get(TOKENIZER_KEY)
        if tok is not None and not isinstance(tok, str):
            raise FormatError(f"{where}: __metadata__.{TOKENIZER_KEY} must be a string of JSON, got {type(tok).__name__}")
        self.tokenizer_json = tok or None
        if self.bf16:
            raise FormatError(f"{where}: BF16 tensors ({sorted(self.bf16)[0]}, ...) do not belong in an edgepanel model")

    def get(self, name: str, dtype=None, shape=None) -> np.ndarray:
        """The tensor `name`, checked against the dtype and shape the model expects."""
        arr = self.tensors.get(name)
        if arr is None:
            raise FormatError(f"{self.path}: tensor '{name}' is missing")
        if dtype is not None:
            allowed = dtype if isinstance(dtype, tuple) else (dtype,)
            if arr.dtype not in [np.dtype(d) for d in allowed]:
                raise FormatError(f"{self.path}: tensor '{name}' has dtype {arr.dtype.name}, expected "
                                  f"{' or '.join(np.dtype(d).name for d in allowed)}")
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise FormatError(f"{self.path}: tensor '{name}' has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        return arr


# ---------------------------------------------------------------------------------------------
# writing


def _remove_stale_temporaries(path: Path):
    """Temporaries of `path` left by writers that no longer run (killed mid-write): NAME.PID.*.tmp."""
    for tmp in path.parent.glob(_glob_escape(path.name) + ".*.tmp"):
        pid = tmp.name[len(path.name) + 1:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def write_tensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """A plain safetensors file (e.g. a training checkpoint), written atomically."""
    with ModelWriter(path) as w:
        for name, a in tensors.items():
            w.add(name, a)
        w.close_with(metadata)
    return Path(path)


class ModelWriter:
    """Write a model file atomically with bounded memory: tensors are spooled to temporary files
    as they come (one per element size), then header and data are written to a temporary file of
    a unique name beside `path` and renamed over it.  Nothing at `path` changes unless `close()`
    succeeds, and two writers of one path never mix their files."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._spool = {s: tempfile.TemporaryFile(dir=self.path.parent) for s in (8, 4, 2, 1)}
        self._entries: dict[int, list] = {s: [] for s in (8, 4, 2, 1)}
        self._sizes = {s: 0 for s in (8, 4, 2, 1)}
        self._names: set[str] = set()

    def add(self, name: str, array: np.ndarray):
        if name in self._names:
            raise ValueError(f"tensor '{name}' written twice")
        a = np.ascontiguousarray(array)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in NAMES:
            raise TypeError(f"tensor '{name}': dtype {a.dtype} cannot be stored")
        a = a.astype(dt, copy=False)
        s = dt.itemsize
        self._spool[s].write(a.tobytes())
        self._entries[s].append((name, NAMES[dt], list(a.shape), self._sizes[s], a.nbytes))
        self._sizes[s] += a.nbytes
        self._names.add(name)

    def close(self, meta: Metadata, tokenizer_json: str | None = None):
        md = {META_KEY: meta.to_json()}
        if tokenizer_json:
            md[TOKENIZER_KEY] = tokenizer_json
        self.close_with(md)

    def close_with(self, metadata: dict[str, str]):
        """Finish the file with `metadata` (str -> str) as its __metadata__."""
        header, base = {}, 0
        for s in (8, 4, 2, 1):
            for name, dtn, shape, off, nbytes in self._entries[s]:
                header[name] = {"dtype": dtn, "shape": shape, "data_offsets": [base + off, base + off + nbytes]}
            base += self._sizes[s]
        header["__metadata__"] = dict(metadata)
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-(8 + len(text)) % 8)
        _remove_stale_temporaries(self.path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.name}.{os.getpid()}.", suffix=".tmp")
        tmp = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)   # as open() would have made it (mkstemp makes 0600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(struct.pack("<Q", len(text)))
                out.write(text)
                for s in (8, 4, 2, 1):
                    sp = self._spool[s]
                    sp.seek(0)
                    while chunk := sp.read(1 << 24):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
            self.abort()

    def abort(self):
        for sp in self._spool.values():
            sp.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()
        return False
