"""Opening plain, gzip and zstd files as one buffered byte stream that reports truncation.

The codec is told by the file's first bytes (gzip ``1f 8b``, zstd ``28 b5 2f fd``, anything else
plain), never by its name. ``open_utf8`` adds what readers of UTF-8 text need: a leading byte-order
mark is skipped and a UTF-16 file is refused with one error naming it.

Both codecs are decoded here member by member (gzip members, zstd frames) rather than with
``gzip.GzipFile`` or zstandard's stream reader: GzipFile's internal buffer drops the data decoded
in the read call that hits the cut, and the zstd stream reader ends silently at a cut. Here every
decoded byte is handed out first, then ``EOFError`` (cut inside a member) or the codec's error
(corrupt bytes) is raised; readers catch it after keeping every record before it.
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path

import zstandard

READ_CHUNK = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
#: Decoded bytes looked at to recognise UTF-16.
SNIFF_BYTES = 4096
#: A compressed stream hands out at least this many bytes per read (unless it ends or fails there),
#: so that a look at its first bytes sees a byte-order mark whole.
MIN_READ = 4

#: The only zstd settings outputs are written with: a fixed level and no threads, so that the same
#: documents give the same bytes (zstd frames carry no timestamps).
ZSTD_LEVEL = 3


class _DecodedRaw(io.RawIOBase):
    """Raw stream over concatenated compressed members (gzip members, zstd frames).

    Everything decoded before a problem is handed out first; then ``EOFError`` if the input stopped
    inside a member, or the decoder's error if the bytes are corrupt."""

    def __init__(self, fileobj: io.BufferedIOBase, name: str) -> None:
        self._f = fileobj
        self._name = name
        self._d = None
        self._in_member = False
        self._pending = memoryview(b"")
        self._error: Exception | None = None
        self._done = False

    def _new_decoder(self):
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while len(self._pending) < MIN_READ and self._error is None and not self._done:
            self._read_chunk()
        if not self._pending:
            if self._error is not None:
                error, self._error, self._done = self._error, None, True
                raise error
            return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _read_chunk(self) -> None:
        """Decode the next input chunk onto the pending bytes; a problem is kept for later."""
        chunk = self._f.read(READ_CHUNK)
        if not chunk:
            self._done = True
            if self._in_member:
                self._error = EOFError(f"{self._name}: compressed stream ended inside a member")
            return
        decoded = self._decode(chunk)
        self._pending = memoryview(self._pending.tobytes() + decoded if self._pending else decoded)

    def _decode(self, chunk: bytes) -> bytes:
        out = []
        try:
            while chunk:
                if not self._in_member:
                    chunk = chunk.lstrip(b"\x00")  # zero padding between/after members
                    if not chunk:
                        break
                    self._d = self._new_decoder()
                    self._in_member = True
                out.append(self._d.decompress(chunk))
                chunk = b""
                if self._d.eof:
                    self._in_member = False
                    chunk = self._d.unused_data
        except (zlib.error, zstandard.ZstdError) as exc:
            self._error = exc
        return b"".join(out)

    def close(self) -> None:
        self._f.close()
        super().close()


class _GzipRaw(_DecodedRaw):
    def _new_decoder(self):
        return zlib.decompressobj(wbits=31)


class _ZstdRaw(_DecodedRaw):
    def _new_decoder(self):
        return zstandard.ZstdDecompressor().decompressobj()


class NotUtf8Error(ValueError):
    """An input file holds UTF-16 text where UTF-8 is read; the message names the file."""


def open_binary(path: str | Path) -> io.BufferedReader:
    """A buffered byte stream over ``path``, decompressed as its first bytes say (gzip, zstd or plain)."""
    raw = open(path, "rb", buffering=READ_CHUNK)
    magic = raw.peek(len(ZSTD_MAGIC))
    if magic.startswith(GZIP_MAGIC):
        return io.BufferedReader(_GzipRaw(raw, str(path)), buffer_size=READ_CHUNK)
    if magic.startswith(ZSTD_MAGIC):
        return io.BufferedReader(_ZstdRaw(raw, str(path)), buffer_size=READ_CHUNK)
    return raw


def open_utf8(path: str | Path) -> io.BufferedReader:
    """``open_binary(path)`` for UTF-8 text: a leading byte-order mark skipped; ``NotUtf8Error`` for
    UTF-16. A stream that cannot be decoded at all raises its codec's error (or ``EOFError``)."""
    stream = open_binary(path)
    try:
        head = stream.peek(SNIFF_BYTES)[:SNIFF_BYTES]
        encoding = _utf16_evidence(head)
        if encoding:
            raise NotUtf8Error(f"{path}: {encoding}; inputs must be UTF-8: convert the file")
    except BaseException:
        stream.close()
        raise
    if head.startswith(UTF8_BOM):
        stream.read(len(UTF8_BOM))
    return stream


def _utf16_evidence(head: bytes) -> str:
    """What shows ``head`` (a file's first decoded bytes) to be UTF-16 text, or "" when nothing does:
    a UTF-16 byte-order mark, or NUL bytes at every other position (more than half of the bytes at one
    parity are NUL, and fewer than a quarter as many at the other)."""
    for bom in UTF16_BOMS:
        if head.startswith(bom):
            return f"UTF-16 text (byte-order mark {bom.hex(' ').upper()})"
    pairs = len(head) // 2
    nul_even = head[0 : 2 * pairs : 2].count(0)
    nul_odd = head[1 : 2 * pairs : 2].count(0)
    many, few = max(nul_even, nul_odd), min(nul_even, nul_odd)
    if many * 2 > pairs and few * 4 < many:
        return "UTF-16 text (a NUL byte at every other position)"
    return ""


def zstd_writer(fileobj: io.BufferedIOBase):
    """A deterministic zstd stream writer over an open binary file (closing it closes the file)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_checksum=True).stream_writer(fileobj)
