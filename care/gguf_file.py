"""The one GGUF header reader: version, metadata, the tensor table and the file type, without the weights.

`read_header(path)` walks the header with `struct`: it is written here, not taken from gguf-py, because
gguf-py's GGUFReader memory-maps the file and builds numpy views of every metadata array element (each
vocabulary string is one): 6-60 s for a 49k-token vocabulary on a 2-core machine, for a table this walk
reads in well under a second. Long arrays (the vocabulary, merges, scores) are skipped and stored as their
length only, unless `arrays=True`. gguf-py is used (when installed) for names only: the quant-type enum
of `general.file_type` and the ggml types' block sizes, which give each tensor's byte size and so a check
that the file holds all of its tensor data (a truncated download fails here, not inside llama.cpp, which can
abort the process on a bad file).

A file that is missing raises ModelNotFoundError; one that is not a GGUF, is truncated or is unreadable
raises InvalidModelError naming the path and, inside the metadata, the key being read.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.errors import InvalidModelError, ModelNotFoundError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
REEXPORT_HINT = "Re-export it with `care export gguf` (or download it again)"

# GGUF value types (8: string, 9: array) and the struct format of each fixed-size one.
STRING, ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRUCTS = {fmt: struct.Struct(fmt) for fmt in set(_SCALARS.values())}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    ggml_type: int
    offset: int = 0  # from the start of the tensor data
    nbytes: int | None = None  # None when gguf-py (the block sizes) is not installed or the type is unknown


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]  # a skipped array is stored as its length (an int)
    tensors: list[TensorInfo]
    data_offset: int  # where the tensor data starts (aligned)
    file_size: int
    arrays_skipped: list[str] = field(default_factory=list)

    @property
    def file_type(self) -> str | None:
        """general.file_type as llama.cpp names it ("Q4_K_M", "F16", "ALL_F32"), None when the key is absent."""
        return file_type_name(self.metadata.get("general.file_type"))

    def tensor_bytes(self) -> dict[str, int]:
        """{tensor: bytes it spans in the file}, up to the next tensor's offset (padding, < alignment, included)."""
        ends = sorted({t.offset for t in self.tensors} | {self.file_size - self.data_offset})
        nxt = {off: ends[i + 1] for i, off in enumerate(ends[:-1])}
        return {t.name: nxt[t.offset] - t.offset for t in self.tensors}


def has_magic(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with the GGUF magic (a quick sniff; read_header checks the rest)."""
    with Path(path).open("rb") as fh:
        return fh.read(4) == MAGIC


def file_type_name(ftype: object) -> str | None:
    """A general.file_type value as its name (Q4_K_M); "ftype N" for a number gguf-py does not know or when it is
    not installed; None for None."""
    if ftype is None:
        return None
    try:
        import gguf

        return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]
    except (ImportError, ValueError, TypeError):
        return f"ftype {ftype}"


@functools.lru_cache(maxsize=1)
def _type_sizes() -> dict[int, tuple[int, int]]:
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        return {}
    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


class _Reader:
    """Reads the header from a memory map of the file, by offset (no Python file call per value)."""

    def __init__(self, buf: Any, path: Path, size: int) -> None:
        self.buf, self.path, self.size = buf, path, size
        self.pos = 0
        self.key = ""  # what is being read, for the error message

    def fail(self, what: str) -> InvalidModelError:
        where = f" (reading {self.key})" if self.key else ""
        return InvalidModelError(f"{what}{where}: {self.path}", path=self.path, hint=REEXPORT_HINT)

    def truncated(self) -> InvalidModelError:
        return self.fail(f"Truncated GGUF header at byte {min(self.pos, self.size)}")

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise self.truncated()
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def num(self, fmt: str) -> Any:
        st = _STRUCTS[fmt]
        if self.pos + st.size > self.size:
            raise self.truncated()
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.truncated()
        self.pos += n

    def skip_strings(self, count: int) -> None:
        """Step over `count` strings (a vocabulary) without decoding them."""
        pos, size, buf, unpack = self.pos, self.size, self.buf, _STRUCTS["<Q"].unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            pos += 8 + unpack(buf, pos)[0]
        else:
            if pos <= size:
                self.pos = pos
                return
        self.pos = min(pos, size)
        raise self.truncated()

    def string(self) -> str:
        n = self.num("<Q")
        if n > self.size:
            raise self.fail(f"Corrupt GGUF header (a {n}-byte string)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, arrays: bool) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.num(_SCALARS[vtype])
        if vtype != ARRAY:
            raise self.fail(f"Corrupt GGUF header (value type {vtype})")
        etype, count = self.num("<I"), self.num("<Q")
        if count > self.size:
            raise self.fail(f"Corrupt GGUF header (an array of {count})")
        if arrays:
            return [self.value(etype, arrays) for _ in range(count)]
        if etype == STRING:
            self.skip_strings(count)
        elif etype in _SCALARS:
            self.skip(struct.calcsize(_SCALARS[etype]) * count)
        else:
            for _ in range(count):
                self.value(etype, arrays)
        return count


def read_header(path: str | os.PathLike[str], *, arrays: bool = False, check_data: bool = True) -> GGUFHeader:
    """The header of the GGUF at `path` (see the module docstring); raises ModelNotFoundError or
    InvalidModelError (path, key being read, fix) for a missing, non-GGUF, truncated or unreadable file.
    check_data=False reads a complete header without checking that the file holds all the tensor data."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}", path=path, hint="Check the path or run `care models`")
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if fh.read(4) != MAGIC:
                raise InvalidModelError(f"Not a GGUF file: {path}", path=path,
                                        hint="Pass a .gguf made by `care export gguf` or llama.cpp")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _walk(_Reader(buf, path, size), arrays)
    except OSError as exc:
        raise InvalidModelError(f"Cannot read the GGUF file: {exc.strerror or exc}: {path}", path=path,
                                hint="Check its permissions (chmod a+r) and the disk") from exc
    data = size - header.data_offset
    for t in header.tensors if check_data else ():
        if t.offset > data or (t.nbytes is not None and t.offset + t.nbytes > data):
            raise InvalidModelError(f"Truncated GGUF: tensor '{t.name}' ends past the end of the file "
                                    f"({size} bytes): {path}", path=path, hint=REEXPORT_HINT)
    return header


def _walk(r: _Reader, arrays: bool) -> GGUFHeader:
    """The header fields after the magic."""
    path, size = r.path, r.size
    r.pos = 4
    version = r.num("<I")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidModelError(f"Unsupported GGUF version {version}: {path}", path=path, hint=REEXPORT_HINT)
    n_tensors, n_kv = r.num("<Q"), r.num("<Q")
    if n_tensors > size or n_kv > size:
        raise r.fail(f"Corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, Any] = {}
    skipped: list[str] = []
    for i in range(n_kv):
        r.key = f"the name of metadata key {i + 1} of {n_kv}"
        key = r.string()
        r.key = f"key '{key}'"
        vtype = r.num("<I")
        meta[key] = r.value(vtype, arrays)
        if vtype == ARRAY and not arrays:
            skipped.append(key)
    r.key = "the tensor table"
    sizes = _type_sizes()
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        shape = tuple(r.num("<Q") for _ in range(r.num("<I")))
        ggml_type, offset = r.num("<I"), r.num("<Q")
        nbytes = None
        if ggml_type in sizes:
            block, type_size = sizes[ggml_type]
            count = 1
            for d in shape:
                count *= d
            nbytes = count // block * type_size
        tensors.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
    r.key = ""
    alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    data_offset = r.pos + (-r.pos) % alignment
    return GGUFHeader(path, version, meta, tensors, data_offset, size, skipped)
