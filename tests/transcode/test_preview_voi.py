"""Windowing for previews: the original's VOI LUT or window makes an 8-bit image a
viewer would show, MONOCHROME1 comes out as MONOCHROME2, colour stays colour."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from transcode.voi import display_frame, full_range, voi_lut, window


def ct(**extra: object) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 12
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def test_a_linear_window_maps_its_range_to_0_255_and_clips_outside() -> None:
    values = np.array([-1000.0, 40 - 200, 40, 40 + 200, 3000.0])
    out = window(values, 40, 400)
    assert out[0] == 0 and out[-1] == 255
    assert out[1] < 1 and out[3] > 254
    assert abs(out[2] - 127.5) < 1


def test_linear_exact_and_sigmoid_follow_ps3_3() -> None:
    values = np.array([0.0, 50.0, 100.0])
    assert list(window(values, 50, 100, "LINEAR_EXACT")) == [0.0, 127.5, 255.0]
    sigmoid = window(values, 50, 100, "SIGMOID")
    assert sigmoid[1] == 127.5 and sigmoid[0] < 31 and sigmoid[2] > 224


def test_the_rescaled_values_are_windowed_from_window_center_and_width() -> None:
    stored = np.array([[0, 1024 + 40], [1024 - 160, 4095]], dtype=np.uint16)
    shown = display_frame(stored, ct(WindowCenter=40, WindowWidth=400))
    assert shown.dtype == np.uint8
    assert shown[0, 0] == 0, "air (-1024 HU) is black in a soft-tissue window"
    assert shown[1, 1] == 255
    assert 126 <= shown[0, 1] <= 129, "the window centre is mid-grey"
    assert shown[1, 0] < shown[0, 1]


def test_the_first_of_several_windows_is_used() -> None:
    stored = np.array([[1024 + 40]], dtype=np.uint16)
    shown = display_frame(stored, ct(WindowCenter=[40, 500], WindowWidth=[400, 2000]))
    assert 126 <= shown[0, 0] <= 129


def test_a_voi_lut_sequence_wins_over_a_window_and_scales_by_its_bit_depth() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 10, 200, 255]
    lut = voi_lut(np.array([-5.0, 0, 1, 2, 3, 99]), item)
    assert list(lut) == [0.0, 0.0, 10.0, 200.0, 255.0, 255.0]
    ds = ct(WindowCenter=40, WindowWidth=400, RescaleIntercept=0)
    ds.VOILUTSequence = [item]
    assert display_frame(np.array([[2]], dtype=np.uint16), ds)[0, 0] == 200


def test_without_a_window_the_frame_s_own_range_is_used() -> None:
    assert list(full_range(np.array([10.0, 20.0, 30.0]))) == [0.0, 127.5, 255.0]
    assert list(full_range(np.array([7.0, 7.0]))) == [0.0, 0.0]
    ds = ct()
    shown = display_frame(np.array([[100, 300]], dtype=np.uint16), ds)
    assert list(shown[0]) == [0, 255]


def test_monochrome1_is_inverted_into_monochrome2() -> None:
    ds = ct(PhotometricInterpretation="MONOCHROME1", RescaleIntercept=0)
    shown = display_frame(np.array([[0, 4095]], dtype=np.uint16), ds)
    assert list(shown[0]) == [255, 0], "low values are white in MONOCHROME1"


def test_an_enhanced_header_s_per_frame_window_and_rescale_are_used() -> None:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    frames = []
    for center in (100, 1000):
        voi, transform, item = Dataset(), Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 200
        transform.RescaleSlope, transform.RescaleIntercept = 1, 0
        item.FrameVOILUTSequence = [voi]
        item.PixelValueTransformationSequence = [transform]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    value = np.array([[1000]], dtype=np.uint16)
    assert display_frame(value, ds, 0)[0, 0] == 255
    assert 126 <= display_frame(value, ds, 1)[0, 0] <= 129


def test_colour_stays_colour_and_wide_samples_are_scaled_to_8_bits() -> None:
    ds = Dataset()
    ds.PhotometricInterpretation = "RGB"
    ds.BitsStored = 16
    rgb = np.array([[[65535, 0, 32768]]], dtype=np.uint16)
    shown = display_frame(rgb, ds)
    assert shown.shape == (1, 1, 3) and shown.dtype == np.uint8
    assert list(shown[0, 0]) == [255, 0, 128]
