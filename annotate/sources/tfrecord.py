"""TFRecord framing, read and written without TensorFlow.

A TFRecord file is a sequence of records, each framed as::

    uint64 length (little-endian) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

We check both CRCs: a silently flipped byte in a 1.9M-step dataset would otherwise
surface as a plausible-looking but wrong action. Files are read through `etils.epath`
so local paths and `gs://` URLs (TFDS's path layer) both work.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import crc32c as _crc32c

from ..errors import CorruptRecordError

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 and add a constant."""
    crc = _crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(
    stream: BinaryIO,
    path: str,
    *,
    check_crc: bool = True,
    skip: int = 0,
    limit: int | None = None,
    on_bad_data: Callable[[CorruptRecordError], None] | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield `(byte_offset, record)` for each record of a TFRecord stream.

    `skip` records are passed over by seeking past their payload (no CRC, no copy),
    which is how an episode range or a worker's slice starts mid-shard cheaply.
    Raises `CorruptRecordError` (naming `path` and the offset) on a CRC mismatch or a
    truncated record. With `on_bad_data`, a record whose *data* CRC fails (framing
    intact, so the next record can still be found) is reported there and skipped;
    a broken frame always raises, since nothing after it can be located.
    """
    offset = 0
    index = 0
    yielded = 0
    while limit is None or yielded < limit:
        header = stream.read(_HEADER.size)
        if not header:
            return
        if len(header) < _HEADER.size:
            raise CorruptRecordError(path, offset, "truncated record header")
        length, length_crc = _HEADER.unpack(header)
        if check_crc and masked_crc32c(header[:8]) != length_crc:
            raise CorruptRecordError(path, offset, "length CRC mismatch")
        if index < skip:
            stream.seek(length + _FOOTER.size, 1)
            offset += _HEADER.size + length + _FOOTER.size
            index += 1
            continue
        data = stream.read(length)
        footer = stream.read(_FOOTER.size)
        if len(data) < length or len(footer) < _FOOTER.size:
            raise CorruptRecordError(path, offset, f"truncated record (expected {length} bytes of data)")
        if check_crc and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
            error = CorruptRecordError(path, offset, "data CRC mismatch")
            if on_bad_data is None:
                raise error
            on_bad_data(error)
        else:
            yield offset, data
        offset += _HEADER.size + length + _FOOTER.size
        index += 1
        yielded += 1


def frame_record(data: bytes) -> bytes:
    """Frame one record in TFRecord format."""
    length = struct.pack("<Q", len(data))
    return length + _FOOTER.pack(masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))


def write_records(stream: BinaryIO, records: Iterable[bytes]) -> int:
    """Write records in TFRecord framing; returns the number written."""
    n = 0
    for data in records:
        stream.write(frame_record(data))
        n += 1
    return n
