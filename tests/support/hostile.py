"""Hostile DICOM inputs that take more than a byte patch to build."""

from __future__ import annotations

import io
import struct
import zlib

from radflow_core.file_meta import encode_file_meta


def deflate_bomb(inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose data set inflates to
    ``inflated_bytes`` (an OB element of zeros) from about a thousandth of that."""
    out = io.BytesIO()
    out.write(encode_file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "1.2.840.10008.1.2.1.99"))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    value = inflated_bytes - 12
    header = b"\x09\x00\x10\x10OB\0\0" + struct.pack("<L", value)
    out.write(deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH))
    # A full flush resets the compressor, so every MiB of zeros compresses to the
    # same block: compress it once and repeat it (seconds saved per bomb).
    block = deflate.compress(bytes(1 << 20)) + deflate.flush(zlib.Z_FULL_FLUSH)
    out.write(block * (value >> 20))
    out.write(deflate.compress(bytes(value & ((1 << 20) - 1))))
    out.write(deflate.flush())
    return out.getvalue()
