"""The structural JPEG check: hand-made streams for each defect, and real encoder output against libjpeg."""
from __future__ import annotations

import dataclasses
import io

import cv2
import numpy as np
import pytest
import simplejpeg

from pipeline.jpeg_check import JpegError, parse_jpeg
from pipeline import shard_worker
from pipeline.shard_worker import BadImage, normalize_image

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
SCAN_DATA = b"\x12\x34\xff\x00\x56\x78\x9a"  # entropy-coded bytes with one stuffed 0xFF


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def dqt(table: int = 0) -> bytes:
    return segment(0xDB, bytes([table]) + bytes(range(1, 65)))


def dht(table_class: int = 0, table: int = 0) -> bytes:
    counts = bytes([0, 1, 5, 1, 1, 1, 1, 1, 1] + [0] * 7)
    return segment(0xC4, bytes([table_class << 4 | table]) + counts + bytes(range(12)))


def sof(components: int = 3, width: int = 40, height: int = 30, marker: int = 0xC0, precision: int = 8,
        ids: tuple[int, ...] | None = None) -> bytes:
    ids = ids or tuple(range(1, components + 1))
    body = bytes([precision]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([components])
    for cid in ids:
        body += bytes([cid, 0x11, 0])
    return segment(marker, body)


def sos(components: int = 3, ids: tuple[int, ...] | None = None, spectral: tuple[int, int, int] = (0, 63, 0)) -> bytes:
    ids = ids or tuple(range(1, components + 1))
    body = bytes([components]) + b"".join(bytes([cid, 0x00]) for cid in ids) + bytes(spectral)
    return segment(0xDA, body)


def jpeg(components: int = 3, extra: bytes = b"", frame: bytes | None = None, scan: bytes | None = None,
         data: bytes = SCAN_DATA, end: bytes = EOI) -> bytes:
    """SOI, [extra], DQT, SOFn, DHT, SOS, scan data, EOI: the smallest stream of the usual shape."""
    return (SOI + extra + dqt() + (frame if frame is not None else sof(components)) + dht()
            + (scan if scan is not None else sos(components)) + data + end)


def adobe(transform: int) -> bytes:
    return segment(0xEE, b"Adobe" + bytes([0, 100, 0, 0, 0, 0, transform]))


def jfif() -> bytes:
    return segment(0xE0, b"JFIF\x00" + bytes([1, 1, 0, 0, 1, 0, 1, 0, 0]))


# ---------------------------------------------------------------------------------------------
# Hand-made streams
# ---------------------------------------------------------------------------------------------

def test_a_minimal_stream_reads_with_size_components_and_colour_space():
    info = parse_jpeg(jpeg(extra=jfif()))
    assert (info.width, info.height, info.components, info.precision) == (40, 30, 3, 8)
    assert info.colorspace == "YCbCr" and info.frame == 0xC0 and not info.progressive and info.scans == 1
    assert info.end == len(jpeg(extra=jfif()))


@pytest.mark.parametrize("extra, components, ids, colorspace", [
    (b"", 1, None, "Gray"),
    (b"", 3, (0x52, 0x47, 0x42), "RGB"),          # component ids 'R', 'G', 'B'
    (adobe(0), 3, None, "RGB"),
    (adobe(1), 3, (0x52, 0x47, 0x42), "YCbCr"),   # the Adobe flag wins over the ids
    (b"", 4, None, "CMYK"),
    (adobe(0), 4, None, "CMYK"),
    (adobe(2), 4, None, "YCCK"),
])
def test_colour_space_follows_libjpeg(extra, components, ids, colorspace):
    data = jpeg(extra=extra, frame=sof(components, ids=ids), scan=sos(components, ids=ids))
    info = parse_jpeg(data)
    assert info.components == components and info.colorspace == colorspace


@pytest.mark.parametrize("data, in_header, message", [
    (jpeg(end=b""), False, r"no end-of-image marker: the file ends inside the data of scan 1"),
    (jpeg()[:30], True, r"segment 0xffdb at byte 2 \(length 67\) runs past the end of the file at byte 30"),
    (SOI + segment(0xE1, b"Exif\0\0")[:-1], True, r"runs past the end of the file"),
    (SOI + b"\xff\xe1\x00\x01" + jpeg()[2:], True, r"segment 0xffe1 at byte 2 has an invalid length 1"),
    (jpeg(frame=sof(3)[:9] + b"\x02" + sof(3)[10:]), True, r"frame header at byte 71: 2 components do not fit its "
                                                           r"length 17"),
    (jpeg(frame=sof(3)[:11] + b"\x00" + sof(3)[12:]), True, r"component 1 has invalid sampling factors 0x00"),
    (jpeg(frame=sof(3, precision=7)), True, r"invalid sample precision 7"),
    (jpeg(frame=sof(3, width=0)), True, r"gives a size of 0x30"),
    (jpeg(frame=sof(3) + sof(3)), True, r"second frame header"),
    (SOI + dqt() + dht() + sos(3) + SCAN_DATA + EOI, True, r"scan at byte \d+ before any frame header"),
    (SOI + sof(3) + dht() + sos(3) + SCAN_DATA + EOI, True, r"quantisation table 0 of component 1 was never defined"),
    (jpeg(scan=sos(3, ids=(1, 2, 9))), True, r"names component 9, which the frame lacks"),
    (jpeg(scan=sos(3, spectral=(0, 5, 0))), True, r"spectral selection 0..5 .* invalid for a baseline frame"),
    (jpeg(frame=sof(3, marker=0xC2), scan=sos(3, spectral=(1, 5, 0))), True, r"spectral selection 1..5"),
    (jpeg(data=b"\x12\xff\x37\x56"), False, r"corrupt data in scan 1: marker 0xff37 at byte \d+ cannot follow"),
    (jpeg(data=b"\x12\xff\xd8\x56"), False, r"corrupt data in scan 1: marker 0xffd8"),
    (SOI + dqt() + b"\x00\x00" + jpeg()[2:], True, r"expected a marker at byte \d+, found 0x00"),
    (SOI + jfif() + EOI, True, r"end-of-image marker at byte \d+ before any scan"),
    (SOI + b"\xff\xd8" + jpeg()[2:], True, r"0xffd8 \(a second start-of-image\)"),
    (b"\xff\xd8\xff", True, r"the file ends at byte 3 before any image data \(truncated\)"),
    (b"\xff\xd8\xff\xe0\x00", True, r"marker 0xffe0 at byte 2 is cut off \(truncated\)"),
    (b"\x89PNG\r\n\x1a\n", True, r"no start-of-image marker"),
])
def test_each_structural_defect_is_named(data, in_header, message):
    with pytest.raises(JpegError, match=message) as e:
        parse_jpeg(data)
    assert e.value.in_header == in_header


def test_what_decoders_accept_is_accepted():
    # fill bytes before markers, restart markers and a stuffed 0xFF in the scan, a comment between segments
    data = (SOI + b"\xff\xff" + dqt() + segment(0xFE, b"comment with \xff\xd9 inside") + segment(0xDD, b"\x00\x02")
            + sof(3) + dht() + sos(3) + b"\x01\xff\x00\x02\xff\xd0\x03\xff\xd1\x04" + b"\xff\xff" + EOI)
    assert parse_jpeg(data).scans == 1
    # bytes after the end-of-image marker (zero padding, or anything) are ignored, as decoders do
    assert parse_jpeg(jpeg() + bytes(100)).end == len(jpeg())
    assert parse_jpeg(jpeg() + b"trailing junk").end == len(jpeg())
    # progressive: several scans with tables between them
    prog = (SOI + dqt() + sof(3, marker=0xC2) + dht() + sos(3, spectral=(0, 0, 0x01)) + SCAN_DATA
            + dht(1, 0) + sos(1, ids=(1,), spectral=(1, 5, 0)) + SCAN_DATA + sos(1, ids=(2,), spectral=(1, 63, 0))
            + SCAN_DATA + EOI)
    info = parse_jpeg(prog)
    assert info.progressive and info.scans == 3


@pytest.mark.parametrize("data, kind", [
    (jpeg(extra=jfif()), None),
    (jpeg(frame=sof(3, marker=0xC2), scan=sos(3, spectral=(0, 0, 0))), None),
    (jpeg(1), "grey"),
    (jpeg(4), "cmyk"),
    (jpeg(extra=adobe(2), frame=sof(4), scan=sos(4)), "cmyk"),
    (jpeg(extra=adobe(0)), "colorspace_rgb"),
    (jpeg(frame=sof(3, marker=0xC9)), "jpeg_sofc9"),
    (jpeg(frame=sof(3, precision=12)), "jpeg_12bit"),
    (b"\x89PNG\r\n\x1a\n" + bytes(30), "png"),
    (b"GIF89a" + bytes(30), "gif"),
])
def test_what_is_stored_and_what_is_re_encoded(data, kind, monkeypatch):
    """The kind each stream is sent to OpenCV with (re-encoding itself is tested on real files in test_shards)."""
    monkeypatch.setattr(shard_worker, "_reencode", lambda data, quality, kind: (b"re-encoded", 7, 5, kind))
    stored, width, height, reencoded = normalize_image(data)
    assert reencoded == kind
    assert (stored, width, height) == ((data, 40, 30) if kind is None else (b"re-encoded", 7, 5))


def test_not_an_image_and_empty_files_are_refused():
    for data, reason in ((b"plain text", "not an image"), (b"", "empty file")):
        with pytest.raises(BadImage, match=reason):
            normalize_image(data)


# ---------------------------------------------------------------------------------------------
# Real encoder output
# ---------------------------------------------------------------------------------------------

def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.uniform(0, 255, (6, 6, 3)).astype(np.float32), (width, height))
    return np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)


def pil_jpeg(mode: str, size: tuple[int, int], **kw) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(photo(*size)).convert(mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name, data, colorspace", [
    ("opencv baseline", cv2.imencode(".jpg", photo(123, 77))[1].tobytes(), "YCbCr"),
    ("opencv progressive", cv2.imencode(".jpg", photo(64, 200), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
     "YCbCr"),
    ("opencv restart markers", cv2.imencode(".jpg", photo(90, 60), [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])[1].tobytes(),
     "YCbCr"),
    ("opencv grey", cv2.imencode(".jpg", photo(33, 17)[..., 0])[1].tobytes(), "Gray"),
    ("pil cmyk", pil_jpeg("CMYK", (50, 40)), "CMYK"),
    ("pil 4:4:4 optimized", pil_jpeg("RGB", (31, 45), subsampling=0, optimize=True), "YCbCr"),
])
def test_real_files_agree_with_libjpeg_and_every_cut_is_caught(name, data, colorspace):
    height, width, libjpeg_colorspace, _ = simplejpeg.decode_jpeg_header(data)
    info = parse_jpeg(data)
    assert (info.width, info.height) == (width, height), name
    assert info.colorspace == libjpeg_colorspace == colorspace, name
    assert info.end == len(data) and parse_jpeg(data, scan_data=False) == dataclasses.replace(info, scans=1)
    cuts = [*range(2, len(data) - 1, max(1, len(data) // 97)), len(data) - 1]
    for scan_data in (True, False):
        for cut in cuts:  # truncated anywhere, even with zero padding after the cut: never accepted
            for padding in (b"", bytes(64)):
                with pytest.raises(JpegError):
                    parse_jpeg(data[:cut] + padding, scan_data=scan_data)


def test_without_the_scan_walk_only_the_end_of_the_file_is_checked():
    data = jpeg(extra=jfif())
    overwritten = jpeg(extra=jfif(), data=b"\x12\xff\x37\x56")  # a stray marker inside the scan data
    assert parse_jpeg(overwritten, scan_data=False).end == len(overwritten)
    with pytest.raises(JpegError, match="corrupt data in scan 1"):
        parse_jpeg(overwritten)
    assert parse_jpeg(data + bytes(7), scan_data=False).end == len(data)  # zero padding
    assert parse_jpeg(data + b"junk", scan_data=False).end == len(data)  # other bytes: found by walking the scans
    with pytest.raises(JpegError, match="no end-of-image marker"):
        parse_jpeg(data[:-2] + b"junk", scan_data=False)


def test_random_bytes_written_over_scan_data_are_caught():
    data = cv2.imencode(".jpg", photo(200, 150, seed=1))[1].tobytes()
    rng = np.random.default_rng(7)
    caught = 0
    for trial in range(50):
        start = int(rng.integers(len(data) // 4, len(data) // 2))
        damaged = data[:start] + rng.bytes(2000) + data[start + 2000:]
        try:
            parse_jpeg(damaged)
        except JpegError as e:
            caught += 1
            assert not e.in_header
    assert caught == 50  # 2000 random bytes hold ~8 0xFF bytes, each followed by a legal byte 10 times in 256
