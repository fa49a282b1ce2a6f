"""Building a dataset whose private sequences nest thousands of levels deep."""

from __future__ import annotations

from support.dicom import _meta_end

_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # (FFFE,E000) item, undefined length
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PRIVATE_SQ = b"\x09\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff"  # (0009,1010) SQ, undefined length


def deeply_nested(part10: bytes, depth: int) -> bytes:
    """``part10`` (Explicit VR Little Endian) with ``depth`` nested sequences inserted
    at the start of its dataset."""
    nest = (_PRIVATE_SQ + _ITEM) * depth + (_ITEM_END + _SEQ_END) * depth
    start = _meta_end(part10)
    return part10[:start] + nest + part10[start:]
