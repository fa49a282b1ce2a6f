"""Codec benchmark: our lossless encoders/decoders next to DCMTK's command-line codecs,
on the same files, in one run. Prints a table and writes bench/results/codecs.json.

    python bench/codecs.py [--frames 40] [--quick]

Inputs (Explicit VR Little Endian, generated so the run needs no download):
- ct: a CT-like 512x512 16-bit signed multi-frame (smooth anatomy-like structure + noise)
- mr: a 256x256 12-bit-in-16 multi-frame
- us-rgb: 8-bit RGB frames (colour ultrasound-like)

Throughput is uncompressed pixel megabytes per second of wall time, measured for the
whole file (DCMTK includes process start, ~5 ms, negligible at these sizes). "encode"
for ours is radflow_codecs.streaming.normalize_file, file to file and frame by
frame: encode *plus* the decode-and-compare that proves the result lossless, i.e. what
the transcode service really pays.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radflow_codecs.codecs import Target, decode
from radflow_codecs.streaming import normalize_file

DCMTK = {
    Target.JPEG_LS_LOSSLESS: ("dcmcjpls", "dcmdjpls"),
    Target.RLE_LOSSLESS: ("dcmcrle", "dcmdrle"),
    Target.JPEG2000_LOSSLESS: None,  # DCMTK's free edition has no JPEG 2000 codec
}


def _image(kind: str, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    if kind == "ct":
        y, x = np.mgrid[0:512, 0:512]
        body = ((x - 256) ** 2 / 200**2 + (y - 256) ** 2 / 160**2) < 1
        base = np.where(body, 40 + (np.sin(x / 17) * np.cos(y / 23) * 300), -1000)
        stack = [
            (base + rng.normal(0, 12, base.shape) + f * 2).astype(np.int16) for f in range(frames)
        ]
        return np.stack(stack), {"bits": 16, "signed": 1, "pi": "MONOCHROME2", "spp": 1}
    if kind == "mr":
        y, x = np.mgrid[0:256, 0:256]
        base = 1500 + 1000 * np.exp(-((x - 128) ** 2 + (y - 128) ** 2) / 4000)
        stack = [
            np.clip(base + rng.normal(0, 30, base.shape), 0, 4095).astype(np.uint16)
            for _ in range(frames)
        ]
        return np.stack(stack), {"bits": 12, "signed": 0, "pi": "MONOCHROME2", "spp": 1}
    y, x = np.mgrid[0:480, 0:640]
    cone = ((x - 320) ** 2 + (y) ** 2) < 420**2
    frames_ = []
    for _ in range(frames):
        gray = np.where(cone, 60 + rng.normal(0, 25, cone.shape), 0).clip(0, 255)
        rgb = np.stack([gray, gray, gray], axis=-1)
        rgb[200:260, 300:340] = (200, 40, 40)  # a colour Doppler patch
        frames_.append(rgb.astype(np.uint8))
    return np.stack(frames_), {"bits": 8, "signed": 0, "pi": "RGB", "spp": 3}


def _write(path: Path, arr: np.ndarray, info: dict[str, Any]) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # multi-frame capable enough for a codec test
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.set_pixel_data(arr, info["pi"], info["bits"], generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def _decode(data: bytes) -> Any:
    return decode(pydicom.dcmread(io.BytesIO(data)))


def _dcmtk(tool: str, src: Path, dst: Path) -> None:
    subprocess.run([tool, str(src), str(dst)], check=True, capture_output=True)


def run(frames: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        for kind in ("ct", "mr", "us-rgb"):
            arr, info = _image(kind, frames, rng)
            src = tmpdir / f"{kind}.dcm"
            _write(src, arr, info)
            raw = src.read_bytes()
            mb = arr.nbytes / 1e6
            for target in (Target.JPEG_LS_LOSSLESS, Target.JPEG2000_LOSSLESS, Target.RLE_LOSSLESS):
                canonical = tmpdir / f"{kind}.ours.{target.name}.dcm"
                enc_s, _ = _timed(normalize_file, src, canonical, target)
                encoded = canonical.read_bytes()
                dec_s, _ = _timed(_decode, encoded)
                row: dict[str, Any] = {
                    "image": kind,
                    "target": target.name,
                    "pixel_mb": round(mb, 1),
                    "ratio": round(len(raw) / len(encoded), 2),
                    "ours_encode_verify_mbps": round(mb / enc_s, 1),
                    "ours_decode_mbps": round(mb / dec_s, 1),
                }
                tools = DCMTK[target]
                if tools:
                    enc_tool, dec_tool = tools
                    out, back = tmpdir / f"{kind}.{target.name}.dcm", tmpdir / f"{kind}.back.dcm"
                    d_enc, _ = _timed(_dcmtk, enc_tool, src, out)
                    d_dec, _ = _timed(_dcmtk, dec_tool, out, back)
                    row.update(
                        {
                            "dcmtk_ratio": round(len(raw) / out.stat().st_size, 2),
                            "dcmtk_encode_mbps": round(mb / d_enc, 1),
                            "dcmtk_decode_mbps": round(mb / d_dec, 1),
                            "encode_vs_dcmtk": round((mb / enc_s) / (mb / d_enc), 2),
                            "decode_vs_dcmtk": round((mb / dec_s) / (mb / d_dec), 2),
                        }
                    )
                rows.append(row)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}",
        "frames": frames,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        "| image | target | ratio (DCMTK) | ours enc+verify MB/s | DCMTK enc MB/s | ratio "
        "| ours dec MB/s | DCMTK dec MB/s | ratio |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in result["rows"]:
        lines.append(
            f"| {r['image']} | {r['target']} | {r['ratio']} ({r.get('dcmtk_ratio', '-')}) "
            f"| {r['ours_encode_verify_mbps']} | {r.get('dcmtk_encode_mbps', '-')} "
            f"| {r.get('encode_vs_dcmtk', '-')} | {r['ours_decode_mbps']} "
            f"| {r.get('dcmtk_decode_mbps', '-')} | {r.get('decode_vs_dcmtk', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="2 frames, for a smoke run")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "codecs.json"
    )
    args = parser.parse_args()
    result = run(2 if args.quick else args.frames)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
