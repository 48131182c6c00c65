"""One chunk's encoded bytes to values: its CRC32C, the size its header states, its decoding.

Decoding into a buffer of the expected size does not say how much was written: a chunk that
decodes to fewer bytes (metadata that claims a wider dtype or more rows per chunk than were
written) would leave the rest of the buffer as it was. So the size a chunk decodes to is
checked, from its header where the codec has one, else after decoding.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from typing import Any

import google_crc32c
import numcodecs
import numcodecs.blosc
import numpy as np

_SIZE_MODULUS: dict[type, int] = defaultdict(lambda: 2**64, {numcodecs.GZip: 2**32})
"""What :func:`decoded_nbytes` states the size modulo."""

_BLOSC_SIZES = struct.Struct("<4xI4xI")
"""nbytes and cbytes in a blosc (1.x) frame header."""


def crc32c(buffer: Any) -> bytes:
    """The CRC32C of ``buffer`` as zarr's ``crc32c`` codec stores it (4 bytes, little-endian)."""
    # google_crc32c takes numpy arrays (any buffer, without a copy), but not memoryviews.
    return int(google_crc32c.value(np.frombuffer(buffer, dtype=np.uint8))).to_bytes(4, "little")


def decoded_nbytes(compressor: Any, encoded: bytes | memoryview) -> int | None:
    """The size an encoded chunk decodes to, as its header states it (None: it does not)."""
    if isinstance(compressor, numcodecs.Blosc):  # a blosc header: nbytes at 4:8, cbytes at 12:16
        nbytes, cbytes = _BLOSC_SIZES.unpack_from(encoded) if len(encoded) >= 16 else (0, -1)
        if cbytes != len(encoded):
            # blosc trusts cbytes and would read past the buffer (numcodecs issue 228)
            msg = f"a blosc frame of {len(encoded)} bytes whose header says otherwise"
            raise ValueError(msg)
        return int(nbytes)
    if isinstance(compressor, numcodecs.Zstd):
        return _zstd_content_size(encoded)
    if isinstance(compressor, numcodecs.GZip) and len(encoded) >= 18:
        # A gzip member ends with the input size modulo 2**32 (RFC 1952); zlib checks the rest
        # (the CRC32 of the decoded bytes) while it decodes.
        return int.from_bytes(encoded[-4:], "little")
    return None


def _zstd_content_size(encoded: bytes | memoryview) -> int | None:
    """Frame_Content_Size of a zstd frame's header (RFC 8878, 3.1.1.1), if the frame has one."""
    head = bytes(encoded[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = head[4]
    single_segment = (descriptor >> 5) & 1
    size = (single_segment, 2, 4, 8)[descriptor >> 6]
    if size == 0:
        return None
    at = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
    if len(head) < at + size:
        return None
    value = int.from_bytes(head[at : at + size], "little")
    return value + 256 if size == 2 else value


def decode_into(compressor: Any, encoded: bytes | memoryview, into: np.ndarray) -> None:
    """Decode one chunk into ``into`` (C-contiguous, exactly one chunk's bytes); raise if it
    does not decode to exactly that many bytes (codecs raise many types of their own)."""
    if compressor is None:
        check_raw_size(encoded, into.nbytes)
        into.reshape(-1).view(np.uint8)[:] = np.frombuffer(encoded, dtype=np.uint8)
        return
    stated = decoded_nbytes(compressor, encoded)
    if stated is not None:
        if stated != into.nbytes % _SIZE_MODULUS[type(compressor)]:
            msg = f"its header says it decodes to {stated} bytes"
            raise ValueError(msg)
        if type(compressor) is numcodecs.Blosc:
            # What Blosc.decode calls, without its argument checks (10-40% of a small chunk's
            # decode): ``encoded`` is a bytes-like object and ``into`` a C-contiguous array.
            numcodecs.blosc.decompress(encoded, into)
        else:
            compressor.decode(encoded, out=into)
        return
    # The header says nothing: decode, then compare the sizes.
    decoded = np.frombuffer(compressor.decode(encoded), dtype=np.uint8)
    if decoded.size != into.nbytes:
        msg = f"decodes to {decoded.size} bytes"
        raise ValueError(msg)
    into.reshape(-1).view(np.uint8)[:] = decoded


def check_raw_size(encoded: bytes | memoryview, nbytes: int) -> None:
    """Raise unless an uncompressed chunk holds exactly ``nbytes`` bytes."""
    if len(encoded) != nbytes:
        msg = f"holds {len(encoded)} bytes, not {nbytes}"
        raise ValueError(msg)
