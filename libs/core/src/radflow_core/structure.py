"""Structural validation of a whole Part 10 file, streaming, before anything trusts it.

A received file is acknowledged only if every later stage can walk it: an element
whose length points past the end, a sequence without its delimiter or a Pixel Data
shorter than its image would otherwise be acknowledged at the door and fail later
(in transcode, at the destination) when the sender can no longer be told. So the
receivers refuse it with the reason, before any blob or event exists.

The walk reads element headers and the few values it needs (the image geometry that
gives native Pixel Data's length, the transfer syntax) and seeks over every other
value, Pixel Data and fragments included: a multi-gigabyte instance costs a few
thousand small reads, never its size in memory. It runs before pydicom parses the
file, so pydicom is never handed a length it would trust (and the file meta group is
bounded here too). Pixel decoding is not attempted: that stays in transcode.

Deflated Explicit VR Little Endian is refused before any byte is inflated: pydicom
inflates the rest of such a file in memory, so a few megabytes of zeros inflate to
gigabytes (see docs/security.md).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom._dicom_dict import DicomDictionary
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from radflow_core.dicom_status import StoreStatus
from radflow_core.instance_header import InvalidInstance
from radflow_core.transfer_syntaxes import ACCEPTED

DEFAULT_MAX_DEPTH = 32
"""Nesting depth of sequences accepted by default; real instances stay below ten."""

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_MAX_META_VALUE = 64 * 1024
"""A file meta element longer than this is not file meta (the longest real one is a
64-character UID); pydicom would otherwise read it into memory whole."""

# Top-level elements whose values give native Pixel Data's expected length.
_ROWS, _COLUMNS, _SAMPLES, _BITS_ALLOCATED = 0x00280010, 0x00280011, 0x00280002, 0x00280100
_FRAMES, _PHOTOMETRIC = 0x00280008, 0x00280004
_GEOMETRY = frozenset({_ROWS, _COLUMNS, _SAMPLES, _BITS_ALLOCATED, _FRAMES, _PHOTOMETRIC})


class StructureInvalid(InvalidInstance):
    """The file's structure is broken; ``detail`` says where, without any value."""

    reason = "structure_invalid"

    def __init__(self, detail: str, status: StoreStatus = StoreStatus.CANNOT_UNDERSTAND) -> None:
        super().__init__(status, detail)


@dataclass(frozen=True)
class Structure:
    """What the walk learned: where the data set starts and how it is encoded."""

    dataset_offset: int
    transfer_syntax_uid: str
    elements: int
    """Elements walked, nested ones included (a measure of the work done)."""


@dataclass
class _Geometry:
    values: dict[int, bytes] = field(default_factory=dict)

    def unsigned(self, tag: int, little: bool) -> int | None:
        raw = self.values.get(tag)
        if raw is None or len(raw) < 2:
            return None
        return int.from_bytes(raw[:2], "little" if little else "big")

    def text(self, tag: int) -> str:
        return self.values.get(tag, b"").decode("ascii", "replace").strip("\0 ")


def _syntax(uid: str) -> tuple[bool, bool, bool]:
    """(little endian, implicit VR, encapsulated Pixel Data) of an accepted syntax."""
    if uid == ImplicitVRLittleEndian:
        return True, True, False
    if uid == ExplicitVRLittleEndian:
        return True, False, False
    if uid == ExplicitVRBigEndian:
        return False, False, False
    return True, False, True


class _Walker:
    def __init__(self, file: BinaryIO, size: int, max_depth: int) -> None:
        self._file = file
        self._size = size
        self._max_depth = max_depth
        self.pos = 0
        self.elements = 0
        self.little = True
        self.encapsulated = False
        self._u16 = struct.Struct("<H")
        self._u32 = struct.Struct("<L")
        self._tag = struct.Struct("<HH")
        self.geometry = _Geometry()

    def set_endian(self, little: bool) -> None:
        self.little = little
        order = "<" if little else ">"
        self._u16 = struct.Struct(order + "H")
        self._u32 = struct.Struct(order + "L")
        self._tag = struct.Struct(order + "HH")

    # Low-level reads: every one checks its bound first, so nothing is read or
    # skipped past ``limit`` (the end of the file or of the enclosing value).

    def read(self, count: int, limit: int, what: str) -> bytes:
        if self.pos + count > limit:
            raise StructureInvalid(f"{what} runs past the end of the data")
        data = self._file.read(count)
        if len(data) != count:
            raise StructureInvalid(f"{what} runs past the end of the data")
        self.pos += count
        return data

    def skip(self, count: int, limit: int, what: str) -> None:
        if self.pos + count > limit:
            raise StructureInvalid(f"{what} length points past the end of the data")
        if count:
            self._file.seek(count, 1)
            self.pos += count

    def tag_length(self, limit: int, what: str) -> tuple[int, int]:
        raw = self.read(8, limit, what)
        group, element = self._tag.unpack_from(raw)
        return group << 16 | element, self._u32.unpack_from(raw, 4)[0]

    def peek_implicit(self, assumed: bool, limit: int) -> bool:
        """pydicom's rule: a data set whose first element has no letters where the VR
        would be is implicit VR, whatever the transfer syntax says."""
        if self.pos + 6 > limit:
            return assumed
        raw = self._file.read(6)
        self._file.seek(-len(raw), 1)
        if len(raw) < 6:
            return assumed
        return not (0x40 < raw[4] < 0x5B and 0x40 < raw[5] < 0x5B)

    # The walk.

    def meta(self) -> str:
        """Check the preamble and walk group 0002; returns the Transfer Syntax UID."""
        preamble = self._file.read(132)
        if len(preamble) < 132 or preamble[128:] != b"DICM":
            raise StructureInvalid("not a DICOM Part 10 file (no preamble/meta)")
        self.pos = 132
        implicit = self.peek_implicit(False, self._size)
        syntax = None
        while self.pos + 8 <= self._size:
            raw = self._file.read(4)
            self._file.seek(-len(raw), 1)
            if len(raw) < 4 or int.from_bytes(raw[:2], "little") != 0x0002:
                break
            tag, _vr, length = self.header(implicit, self._size)
            if length == _UNDEFINED or length > _MAX_META_VALUE:
                raise StructureInvalid("a file meta element is too long")
            value = self.read(length, self._size, "a file meta element")
            if tag == 0x00020010:
                syntax = value.decode("ascii", "replace").strip("\0 ")
        if not syntax:
            raise StructureInvalid(
                "no Transfer Syntax UID in file meta", StoreStatus.MISSING_ATTRIBUTE
            )
        return syntax

    def header(self, implicit: bool, limit: int) -> tuple[int, bytes | None, int]:
        """One element header: (tag, explicit VR or None, value length)."""
        if implicit:
            tag, length = self.tag_length(limit, "an element header")
            return tag, None, length
        raw = self.read(8, limit, "an element header")
        group, element = self._tag.unpack_from(raw)
        tag = group << 16 | element
        if tag in (_ITEM, _ITEM_END, _SEQUENCE_END):
            return tag, None, self._u32.unpack_from(raw, 4)[0]
        vr = raw[4:6]
        if vr in _LONG_VRS:
            return tag, vr, self._u32.unpack(self.read(4, limit, "an element header"))[0]
        return tag, vr, self._u16.unpack_from(raw, 6)[0]

    def dataset(self, end: int | None, limit: int, implicit: bool, depth: int, top: bool) -> None:
        """Walk one data set: to ``end`` exactly, or (``end`` None) to its Item
        Delimitation Item, never past ``limit``."""
        if top or not implicit:
            implicit = self.peek_implicit(implicit, end if end is not None else limit)
        stop = end if end is not None else limit
        while True:
            if end is not None and self.pos == end:
                return
            if end is None and top and self.pos == limit:
                return
            tag, vr, length = self.header(implicit, stop)
            self.elements += 1
            if tag == _ITEM_END:
                if end is None and not top:
                    return
                raise StructureInvalid("an Item Delimitation Item outside an item")
            if tag in (_ITEM, _SEQUENCE_END):
                raise StructureInvalid("an item tag where a data element was expected")
            self.element(tag, vr, length, stop, implicit, depth, top)

    def element(
        self,
        tag: int,
        vr: bytes | None,
        length: int,
        limit: int,
        implicit: bool,
        depth: int,
        top: bool,
    ) -> None:
        if tag == _PIXEL_DATA or tag in _FLOAT_PIXEL_DATA:
            self.pixel_data(tag, length, limit, top)
            return
        if length == _UNDEFINED:
            # An undefined length is only valid for a sequence; UN with undefined
            # length is a sequence encoded implicit VR little endian (PS3.5 §6.2.2).
            if vr is not None and vr not in (b"SQ", b"UN"):
                raise StructureInvalid(
                    f"an element of VR {vr.decode('ascii', 'replace')} with undefined length"
                )
            self.sequence(None, limit, implicit or vr == b"UN", depth)
            return
        if vr == b"SQ" or (vr is None and _dictionary_vr(tag) == "SQ"):
            if self.pos + length > limit:
                raise StructureInvalid("a sequence length points past the end of the data")
            self.sequence(self.pos + length, limit, implicit, depth)
            return
        if top and tag in _GEOMETRY and length <= 64:
            self.geometry.values[tag] = self.read(length, limit, "an element value")
            return
        self.skip(length, limit, "an element")

    def sequence(self, end: int | None, limit: int, implicit: bool, depth: int) -> None:
        if depth >= self._max_depth:
            raise StructureInvalid("sequences nested too deeply")
        stop = end if end is not None else limit
        while True:
            if end is not None and self.pos == end:
                return
            tag, length = self.tag_length(stop, "a sequence item header")
            if tag == _SEQUENCE_END:
                if end is None:
                    return
                raise StructureInvalid("a Sequence Delimitation Item in a defined-length sequence")
            if tag != _ITEM:
                raise StructureInvalid("a sequence holds something other than items")
            if length == _UNDEFINED:
                self.dataset(None, stop, implicit, depth + 1, top=False)
            else:
                if self.pos + length > stop:
                    raise StructureInvalid("an item length points past the end of its sequence")
                self.dataset(self.pos + length, stop, implicit, depth + 1, top=False)

    def pixel_data(self, tag: int, length: int, limit: int, top: bool) -> None:
        if length == _UNDEFINED:
            self.fragments(limit)
            return
        if top and self.encapsulated and tag == _PIXEL_DATA:
            raise StructureInvalid(
                "Pixel Data is not encapsulated although the transfer syntax is compressed"
            )
        if self.pos + length > limit:
            raise StructureInvalid("Pixel Data length points past the end of the data")
        if top:
            self.native_length(length)
        self.skip(length, limit, "Pixel Data")

    def fragments(self, limit: int) -> None:
        """Encapsulated Pixel Data (PS3.5 §A.4): a Basic Offset Table item, fragment
        items, a Sequence Delimitation Item; every length inside the data."""
        tag, length = self.tag_length(limit, "the Basic Offset Table item")
        if tag != _ITEM:
            raise StructureInvalid("encapsulated Pixel Data does not start with an item")
        if length == _UNDEFINED:
            raise StructureInvalid("an encapsulated Pixel Data item has undefined length")
        self.skip(length, limit, "the Basic Offset Table")
        while True:
            tag, length = self.tag_length(limit, "a Pixel Data fragment header")
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise StructureInvalid("encapsulated Pixel Data holds something other than items")
            if length == _UNDEFINED:
                raise StructureInvalid("an encapsulated Pixel Data item has undefined length")
            self.skip(length, limit, "a Pixel Data fragment")

    def native_length(self, length: int) -> None:
        geometry = self.geometry
        rows = geometry.unsigned(_ROWS, self.little)
        columns = geometry.unsigned(_COLUMNS, self.little)
        bits = geometry.unsigned(_BITS_ALLOCATED, self.little)
        if not rows or not columns or not bits:
            raise StructureInvalid("Pixel Data without Rows, Columns or Bits Allocated")
        samples = geometry.unsigned(_SAMPLES, self.little) or 1
        frames_text = geometry.text(_FRAMES)
        try:
            frames = int(frames_text) if frames_text else 1
        except ValueError:
            raise StructureInvalid("Number of Frames is not a number") from None
        frames = max(frames, 1)
        pixels = rows * columns * frames
        expected = (pixels * samples * bits + 7) // 8
        if geometry.text(_PHOTOMETRIC) == "YBR_FULL_422":
            # Two chroma samples shared by two pixels (PS3.3 §C.7.6.3.1.2).
            expected = expected // 3 * 2
        # Longer is accepted: decoders drop the excess (some modalities pad Pixel
        # Data to a block size); shorter would leave frames without their pixels.
        if length < expected:
            raise StructureInvalid(
                f"native Pixel Data holds {length} bytes; its image needs {expected}"
            )


def _dictionary_vr(tag: int) -> str | None:
    entry = DicomDictionary.get(tag)
    return entry[0] if entry else None


def check_structure(file: BinaryIO, size: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Structure:
    """Walk the whole Part 10 ``file`` (``size`` bytes) without loading its values.

    Blocking; leaves the file position undefined.

    Raises:
        StructureInvalid: what is broken (status 0xC000, or 0xC001 without a
            transfer syntax, 0xC122 for a refused one).
    """
    file.seek(0)
    walker = _Walker(file, size, max_depth)
    syntax = walker.meta()
    if syntax == DeflatedExplicitVRLittleEndian:
        raise StructureInvalid(
            "deflated transfer syntax is refused", StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED
        )
    if syntax not in ACCEPTED:
        raise StructureInvalid(
            "transfer syntax not accepted", StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED
        )
    offset = walker.pos
    little, implicit, encapsulated = _syntax(syntax)
    walker.set_endian(little)
    walker.encapsulated = encapsulated
    walker.dataset(None, size, implicit, 0, top=True)
    return Structure(offset, syntax, walker.elements)
