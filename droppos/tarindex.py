"""The shard file format, owned here: a tar of samples and its DALI index (`.idx`).

A sample is one tar member per component, `{key}.{ext}`, adjacent and in sorted component
order; every member has the same fixed mtime, owner and mode, so the same samples give
byte-identical tars. The index is the format of DALI's `wds2idx` (v1.2): a header line
`v1.2 <samples>`, then one line per sample of `ext offset size name` groups, `offset` being
where the member's data starts. `droppos shard` writes both in one pass (`IndexedTarWriter`),
`--verify` and a resumed run check an index against the tar's real headers (`scan_tar`,
`index_problem`), and the loaders read an index through `iter_index` / `read_index`.
Standard library only: the shard workers never import torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, NamedTuple, Sequence

TAR_BLOCK = 512
INDEX_VERSION = "v1.2"  # the index format of DALI's wds2idx
TAR_MTIME = 946684800  # 2000-01-01: fixed, so the same input and options give byte-identical tars
TAR_OWNER = "droppos"  # user and group name of every member
TAR_MODE = 0o444


class IndexEntry(NamedTuple):
    """One component of a sample as the index lists it."""

    ext: str
    offset: int  # where the member's data starts in the tar
    size: int
    name: str


class BadIndex(ValueError):
    """An index that cannot be parsed; the message says where."""


class BadTar(Exception):
    """A tar that cannot be read as one; the message is the one-line reason."""


# --------------------------------------------------------------------------------------------
# Writing


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through (one pass, no re-read)."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.file.flush()


class IndexedTarWriter:
    """Samples into a tar stream on `file` (a binary file open for writing), with their index lines.

    The tar is, byte for byte, the one webdataset's TarWriter writes with `encoder=False,
    mtime=TAR_MTIME, user=group=TAR_OWNER, mode=TAR_MODE` (a streamed tarfile in Python's default
    PAX format: plain USTAR headers for our ASCII names), so datasets written before stay valid. `sha256` and `size` describe the bytes written so far; `close()` ends the tar (the file
    stays open: its owner flushes, syncs and closes it).
    """

    def __init__(self, file: BinaryIO):
        self._hashing = _HashingWriter(file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w|", format=tarfile.PAX_FORMAT)
        self.samples: list[tuple[IndexEntry, ...]] = []

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def sha256(self) -> str:
        return self._hashing.sha256.hexdigest()

    @property
    def size(self) -> int:
        return self._hashing.size

    def add(self, key: str, components: dict[str, bytes]) -> None:
        """One sample: a member `{key}.{ext}` per component, in sorted order, and its index line."""
        entries = []
        for ext in sorted(components):
            data = components[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
            info.uname = info.gname = TAR_OWNER
            self._tar.addfile(info, io.BytesIO(data))
            data_offset = self._tar.offset - _padded(len(data))  # after the member's header(s)
            entries.append(IndexEntry(ext, data_offset, len(data), info.name))
        self.samples.append(tuple(entries))

    def close(self) -> None:
        """End the tar (two zero blocks, padding to tarfile's record size) and flush it into the file."""
        self._tar.close()

    def index_bytes(self) -> bytes:
        return format_index(self.samples)


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def format_index(samples: Sequence[Sequence[IndexEntry]]) -> bytes:
    """The index file of `samples`, as wds2idx writes it."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e.ext} {e.offset} {e.size} {e.name}" for e in entries) for entries in samples]
    return "".join(line + "\n" for line in lines).encode("ascii")


# --------------------------------------------------------------------------------------------
# Reading an index


def _split_index(data: bytes) -> tuple[list[str], list[list[str]]]:
    """An index's header fields and each sample line's fields (raises UnicodeDecodeError: not ASCII)."""
    lines = data.decode("ascii").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    header = lines[0].split() if lines else []
    return header, [line.split() for line in lines[1:]]


def _count(header: list[str], where: str) -> int:
    """The sample count of a header line's fields."""
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise BadIndex(f"{where}: header {' '.join(header)!r} is not `{INDEX_VERSION} <samples>`")
    return int(header[1])


def _entries(fields: list[str], where: str, number: int) -> tuple[IndexEntry, ...]:
    """The components of one sample line (line `number` of the file)."""
    if not fields or len(fields) % 4:
        raise BadIndex(f"{where}: line {number}: {len(fields)} fields, not groups of `ext offset size name`")
    entries = []
    for i in range(0, len(fields), 4):
        ext, offset, size, name = fields[i : i + 4]
        if not (offset.isdigit() and size.isdigit()):
            raise BadIndex(f"{where}: line {number}: offset {offset!r} or size {size!r} of {name} is not a number")
        entries.append(IndexEntry(ext, int(offset), int(size), name))
    return tuple(entries)


def parse_index(data: bytes, where: str = "index") -> list[tuple[IndexEntry, ...]]:
    """Every sample of an index; raises BadIndex when it is malformed or its count is wrong."""
    try:
        header, rows = _split_index(data)
    except UnicodeDecodeError:
        raise BadIndex(f"{where}: not an ASCII text file") from None
    count = _count(header, where)
    samples = [_entries(fields, where, number) for number, fields in enumerate(rows, 2)]
    if count != len(samples):
        raise BadIndex(f"{where}: header says {count} samples, {len(samples)} lines follow")
    return samples


def read_index(path: str | Path) -> list[tuple[IndexEntry, ...]]:
    """`parse_index` of an index file."""
    return parse_index(Path(path).read_bytes(), str(path))


def iter_index(path: str | Path) -> Iterator[tuple[IndexEntry, ...]]:
    """The samples of an index file in order, parsed line by line (a reader that stops early reads no further)."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            _count(f.readline().decode("ascii").split(), where)
            for number, line in enumerate(f, 2):
                yield _entries(line.decode("ascii").split(), where, number)
    except UnicodeDecodeError:
        raise BadIndex(f"{where}: not an ASCII text file") from None


def index_sample(path: str | Path, number: int) -> tuple[IndexEntry, ...]:
    """The components of sample `number` (from 0) of an index file."""
    with contextlib.closing(iter_index(path)) as samples:
        for entries in islice(samples, number, None):
            return entries
    raise BadIndex(f"{path}: no sample {number}")


def sample_start(entries: Sequence[IndexEntry]) -> int:
    """Where a sample begins in its tar: the header of its first member."""
    return min(e.offset for e in entries) - TAR_BLOCK


# --------------------------------------------------------------------------------------------
# Checking a tar and its index


class _HashingReader:
    """A read-only file wrapper that hashes what is read, so a tar is checked in one pass."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class TarScan(NamedTuple):
    """One read of a tar: its sha256, each member's (name, data offset, size) in tar order, and
    the data of the components asked for, by sample key and extension."""

    sha256: str
    members: list[tuple[str, int, int]]
    samples: dict[str, dict[str, bytes | None]]


def scan_tar(path: Path, keep: Iterable[str] = ()) -> TarScan:
    """Stream `path` once (headers, hash, the `keep` components' data); raises BadTar if it is no readable tar."""
    keep = frozenset(keep)
    members: list[tuple[str, int, int]] = []
    samples: dict[str, dict[str, bytes | None]] = {}
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    members.append((member.name, member.offset_data, member.size))
                    wanted = ext in keep and member.isfile()
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read() if wanted else None
        except (tarfile.TarError, OSError, EOFError) as err:
            raise BadTar(f"{path.name}: not a readable tar ({_describe(err)}); re-run `droppos shard`") from None
        reader.drain()
    return TarScan(reader.sha256.hexdigest(), members, samples)


def index_problem(index: Path, members: list[tuple[str, int, int]]) -> str | None:
    """What is wrong with an index given the tar's real headers (None: it matches entry by entry).

    DALI reads a component at the offset and size its index gives, trusting the name: one
    wrong offset makes it train on another sample's label. So every entry must name the
    component the tar holds at that data offset, with that size, on the line of its sample,
    and every component of the tar must be listed once, in tar order.
    """
    expected: list[list[tuple[str, str, str, str]]] = []
    key = None
    for name, offset, size in members:
        member_key, _, ext = name.partition(".")
        if member_key != key:
            expected.append([])
            key = member_key
        expected[-1].append((ext, str(offset), str(size), name))
    try:
        header, rows = _split_index(index.read_bytes())
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot be read as an index ({_describe(err)})"
    if header != [INDEX_VERSION, str(len(expected))]:
        return f"header {' '.join(header)!r} does not match the {len(expected)} samples of the tar"
    if len(rows) != len(expected):
        return f"{len(rows)} sample lines for the {len(expected)} samples of the tar"
    held = {str(offset): (name, size) for name, offset, size in members}
    for number, (fields, components) in enumerate(zip(rows, expected), 2):
        listed = [tuple(fields[i : i + 4]) for i in range(0, len(fields), 4)]
        if listed == components:
            continue
        sample = components[0][3].partition(".")[0]
        wrong = next((got for got, want in zip(listed, components) if got != want), None)
        if wrong is None or len(wrong) != 4:
            return f"line {number} lists {len(fields) / 4:g} components, the tar holds {len(components)} for sample {sample}"
        ext, offset, size, name = wrong
        there = held.get(offset)
        actual = f"{there[0]} ({there[1]} bytes)" if there else "no member's data"
        return f"line {number}: {ext} entry `{name}` at offset {offset} ({size} bytes), but the tar holds {actual} there"
    return None


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
