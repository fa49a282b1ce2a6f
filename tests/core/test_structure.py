"""The streaming structural validator: hostile files refused with a reason, every valid
file pydicom bundles accepted."""

from __future__ import annotations

import io
import resource
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence

from radflow_core.dicom_status import StoreStatus
from radflow_core.file_meta import encode_file_meta
from radflow_core.structure import StructureInvalid, check_structure
from support.dicom import TEST_FILES, _meta_end, bundled_file, make_instance
from support.hostile import deflate_bomb
from support.nesting import deeply_nested

REFUSED_BUNDLED = {
    # Truncated on purpose by pydicom's authors.
    "MR_truncated.dcm": "Pixel Data length points past the end of the data",
    "rtplan_truncated.dcm": "a sequence length points past the end of the data",
    # Number of Frames "1A": no decoder can tell how many frames there are.
    "badVR.dcm": "Number of Frames is not a number",
    # Pixel Data but no image geometry (and no SOP UIDs either).
    "nested_priv_SQ.dcm": "Pixel Data without Rows, Columns or Bits Allocated",
    "image_dfl.dcm": "deflated transfer syntax is refused",
    "meta_missing_tsyntax.dcm": "no Transfer Syntax UID in file meta",
}


def _check(raw: bytes, max_depth: int = 32) -> None:
    check_structure(io.BytesIO(raw), len(raw), max_depth)


def _refusal(raw: bytes, max_depth: int = 32) -> StructureInvalid:
    with pytest.raises(StructureInvalid) as info:
        _check(raw, max_depth)
    return info.value


def _pydicom_reads(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            list(ds.iterall())
    except Exception:  # pydicom's own verdict, whatever it raises
        return False
    return True


def test_every_bundled_file_pydicom_reads_is_accepted_but_the_broken_ones() -> None:
    refused = {}
    accepted = 0
    for path in sorted(TEST_FILES.glob("*.dcm")):
        if not _pydicom_reads(path):
            continue
        try:
            _check(path.read_bytes())
            accepted += 1
        except StructureInvalid as exc:
            refused[path.name] = exc.detail
    assert refused == REFUSED_BUNDLED
    assert accepted > 50


def _top_level_ends(raw: bytes, implicit: bool, little: bool) -> set[int]:
    """Offsets where a top-level element ends (a cut there leaves a shorter but
    well-formed data set, which no validator can tell from a complete one)."""
    start = _meta_end(raw)
    fp = io.BytesIO(raw)
    fp.seek(start)
    ends = {start}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in data_element_generator(fp, implicit, little, defer_size=None):
            ends.add(fp.tell())
    return ends


def _nested_instance(tmp_path: Path) -> bytes:
    """Explicit VR LE with a sequence of two items, one holding another sequence."""
    inner = Dataset()
    inner.CodeValue = "121"
    inner.CodingSchemeDesignator = "DCM"
    outer = Dataset()
    outer.ReferencedSOPInstanceUID = "1.2.3"
    outer.ConceptNameCodeSequence = Sequence([inner])
    second = Dataset()
    second.ReferencedSOPInstanceUID = "1.2.4"
    path = make_instance(
        tmp_path / "nested.dcm",
        rows=4,
        columns=3,
        extra={"ReferencedImageSequence": Sequence([outer, second])},
    )
    return path.read_bytes()


@pytest.mark.parametrize(
    ("name", "implicit", "little"),
    [
        ("nested", False, True),
        ("rtplan.dcm", True, True),  # implicit VR, defined-length sequences
        ("SC_rgb_small_odd_big_endian.dcm", False, False),
        ("UN_sequence.dcm", False, True),  # UN of undefined length: implicit items
        ("SC_rgb_rle.dcm", False, True),  # encapsulated fragments
        ("JPEG2000.dcm", False, True),
    ],
)
def test_a_file_cut_anywhere_but_between_top_level_elements_is_refused(
    name: str, implicit: bool, little: bool, tmp_path: Path
) -> None:
    raw = _nested_instance(tmp_path) if name == "nested" else bundled_file(name).read_bytes()
    _check(raw)
    ends = _top_level_ends(raw, implicit, little)
    start = _meta_end(raw)
    for cut in range(start, len(raw)):
        truncated = raw[:cut]
        if cut in ends:
            continue
        with pytest.raises(StructureInvalid, match=r"past the end|Pixel Data"):
            _check(truncated)
    # And inside the file meta: never a Part 10 file.
    for cut in range(0, start, 7):
        with pytest.raises(StructureInvalid):
            _check(raw[:cut])


def _element_offset(raw: bytes, tag: bytes) -> int:
    offset = raw.index(tag, _meta_end(raw))
    return offset


def test_a_length_pointing_past_the_end_is_refused_wherever_it_is(tmp_path: Path) -> None:
    raw = _nested_instance(tmp_path)
    # Patient ID (0010,0020) LO: 2-byte length.
    at = _element_offset(raw, b"\x10\x00\x20\x00LO")
    patched = raw[: at + 6] + struct.pack("<H", 0xFFF0) + raw[at + 8 :]
    assert "past the end" in _refusal(patched).detail
    # An item inside the sequence whose defined length passes its sequence's end.
    ds = pydicom.dcmread(bundled_file("rtplan.dcm"))
    assert ds.BeamSequence
    rtplan = bundled_file("rtplan.dcm").read_bytes()
    item = rtplan.index(b"\xfe\xff\x00\xe0", _meta_end(rtplan))
    patched = rtplan[: item + 4] + struct.pack("<L", 0x7FFFFFFF) + rtplan[item + 8 :]
    assert "past the end" in _refusal(patched).detail


def _encapsulated(fragments: bytes) -> bytes:
    buffer = io.BytesIO()
    buffer.write(encode_file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "1.2.840.10008.1.2.4.50"))
    buffer.write(b"\x28\x00\x10\x00US\x02\x00\x04\x00")  # Rows 4
    buffer.write(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")  # Pixel Data, undefined
    buffer.write(fragments)
    return buffer.getvalue()


_ITEM = b"\xfe\xff\x00\xe0"
_SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("fragments", "reason"),
    [
        (_ITEM + b"\0\0\0\0" + _ITEM + b"\4\0\0\0abcd" + _SEQ_END, None),
        (b"\xfe\xff\x0d\xe0\0\0\0\0" + _SEQ_END, "does not start with an item"),
        (_ITEM + b"\0\0\0\0" + _ITEM + b"\x00\x01\0\0abcd" + _SEQ_END, "past the end"),
        (_ITEM + b"\0\0\0\0" + _ITEM + b"\4\0\0\0abcd", "past the end"),
        (
            _ITEM + b"\0\0\0\0" + b"\x08\x00\x10\x00" + b"\4\0\0\0abcd" + _SEQ_END,
            "other than items",
        ),
        (_ITEM + b"\0\0\0\0" + _ITEM + b"\xff\xff\xff\xff" + _SEQ_END, "undefined length"),
        (_ITEM + b"\x10\0\0\0" + _SEQ_END, "past the end"),
    ],
)
def test_malformed_encapsulated_fragments_are_refused(fragments: bytes, reason: str | None) -> None:
    raw = _encapsulated(fragments)
    if reason is None:
        _check(raw)
    else:
        assert reason in _refusal(raw).detail


def test_native_pixel_data_shorter_than_its_image_is_refused(tmp_path: Path) -> None:
    raw = make_instance(tmp_path / "a.dcm", rows=16, columns=16).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.PixelData = ds.PixelData[:-2]
    short = io.BytesIO()
    ds.save_as(short)
    refusal = _refusal(short.getvalue())
    assert refusal.status is StoreStatus.CANNOT_UNDERSTAND
    assert refusal.detail == "native Pixel Data holds 510 bytes; its image needs 512"
    ds.NumberOfFrames = 2
    ds.PixelData = bytes(1024)
    two = io.BytesIO()
    ds.save_as(two)
    _check(two.getvalue())
    ds.NumberOfFrames = 3
    three = io.BytesIO()
    ds.save_as(three)
    assert "needs 1536" in _refusal(three.getvalue()).detail


def test_odd_native_pixel_data_may_carry_its_pad_byte(tmp_path: Path) -> None:
    ds = pydicom.dcmread(make_instance(tmp_path / "a.dcm", rows=3, columns=5))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(15)  # pydicom pads it to 16 on writing
    out = io.BytesIO()
    ds.save_as(out)
    _check(out.getvalue())


def test_sequences_nested_past_the_limit_are_refused(tmp_path: Path) -> None:
    base = make_instance(tmp_path / "a.dcm").read_bytes()
    _check(deeply_nested(base, 32))
    assert _refusal(deeply_nested(base, 33)).detail == "sequences nested too deeply"
    assert _refusal(deeply_nested(base, 20000)).detail == "sequences nested too deeply"


def test_a_deflate_bomb_is_refused_without_inflating_it() -> None:
    bomb = deflate_bomb(1 << 30)
    assert len(bomb) < 2 * 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refusal = _refusal(bomb)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert refusal.status is StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED
    assert refusal.detail == "deflated transfer syntax is refused"
    assert grown_kib < 16 * 1024


def test_an_oversized_file_meta_element_is_refused_before_pydicom_reads_it() -> None:
    raw = bundled_file("CT_small.dcm").read_bytes()
    # (0002,0013) SH with its 2-byte length patched: still in the file, but not meta.
    at = raw.index(b"\x02\x00\x13\x00SH")
    huge = raw[: at + 4] + b"OB\0\0" + struct.pack("<L", 1 << 20) + raw[at + 8 :] + bytes(1 << 20)
    assert _refusal(huge).detail == "a file meta element is too long"
