"""Structural check of a JPEG file without decoding it: marker segments, frame header, scans, end marker.

:func:`parse_jpeg` walks a JPEG stream (ITU-T T.81, Annex B) the way a decoder's marker reader does,
but skips the Huffman decoding of the entropy-coded data:

- the stream starts with SOI, every marker segment's length fits the file and the segments with a
  fixed layout (SOF, SOS, DQT, DHT, DRI) have consistent lengths and fields;
- exactly one frame header (SOFn) precedes the first scan; its precision, size and components are
  read from it (the image size comes from here, nothing is decoded);
- every scan (SOS) names components of the frame whose quantisation tables are defined, with a
  spectral selection that fits the frame type (sequential: 0..63; progressive: a DC or an AC band);
- the entropy-coded data of each scan is scanned for markers at C speed (:mod:`re`): inside it a
  0xFF byte may only be followed by 0x00 (byte stuffing), 0xD0-0xD7 (restart markers) or more 0xFF
  fill bytes; the first other marker must be a legal segment after a scan or EOI. Random bytes
  written over scan data are caught here with near certainty (an isolated 0xFF followed by an
  arbitrary byte), and so is a file cut short, which ends without EOI;
- the stream ends with EOI after at least one scan. Bytes after EOI are allowed (some cameras and
  editors pad files); decoders ignore them.

What it cannot see: damaged entropy-coded data that keeps the marker structure (wrong Huffman codes,
a flipped bit), which libjpeg reports only as a warning ("Corrupt JPEG data") while it still
returns an image. The converter's ``--verify decode`` mode decodes every image to catch those.

The colour space is inferred as libjpeg-turbo does (``jdapimin.c``): 1 component -> ``Gray``;
3 -> ``YCbCr`` when a JFIF header is present, else from the Adobe APP14 transform flag
(0 -> ``RGB``), else from the component ids (``R``, ``G``, ``B`` -> ``RGB``), else ``YCbCr``;
4 -> ``YCCK`` when the Adobe transform flag is 2, else ``CMYK``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["JpegError", "JpegInfo", "parse_jpeg", "is_jpeg", "SEQUENTIAL_HUFFMAN_FRAMES", "frame_name"]

#: SOFn markers that start a frame header (C4 = DHT, C8 = JPG, CC = DAC are not frames)
_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: baseline (C0), extended sequential (C1) and progressive (C2) Huffman frames: what every decoder reads
SEQUENTIAL_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_FRAME_NAMES = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless",
                0xC5: "differential sequential", 0xC6: "differential progressive", 0xC7: "differential lossless",
                0xC9: "arithmetic sequential", 0xCA: "arithmetic progressive", 0xCB: "arithmetic lossless",
                0xCD: "arithmetic differential sequential", 0xCE: "arithmetic differential progressive",
                0xCF: "arithmetic differential lossless"}
#: inside entropy-coded data: 0xFF followed by anything but 0x00 (stuffing), RST0-7 or another 0xFF
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def frame_name(marker: int) -> str:
    """``progressive`` for 0xC2 and so on."""
    return _FRAME_NAMES.get(marker, f"SOF 0x{marker:02x}")


class JpegError(ValueError):
    """A JPEG stream that is malformed or cut short. ``in_header`` is True when the problem lies before
    the first scan (the headers cannot be read), False when it lies in or after the scan data."""

    def __init__(self, message: str, in_header: bool):
        super().__init__(message)
        self.in_header = in_header


@dataclass(frozen=True, slots=True)
class JpegInfo:
    """What the frame header and the markers say about a JPEG stream.

    Attributes:
        width, height: image size in pixels (from the SOFn segment).
        components: number of colour components (1, 3 or 4 in practice).
        precision: bits per sample (8 for ordinary JPEGs, 12 for some medical/raw files).
        frame: the SOFn marker byte (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...).
        colorspace: ``Gray``, ``YCbCr``, ``RGB``, ``CMYK``, ``YCCK`` or ``unknown`` (see the module doc).
        scans: number of scans (1 for a baseline image, several for progressive ones).
        end: offset just past the EOI marker (``len(data) - end`` trailing bytes follow it).
    """

    width: int
    height: int
    components: int
    precision: int
    frame: int
    colorspace: str
    scans: int
    end: int

    @property
    def progressive(self) -> bool:
        return self.frame in _PROGRESSIVE


def is_jpeg(data: bytes) -> bool:
    """True when ``data`` starts like a JPEG stream (SOI followed by a marker)."""
    return data[:3] == b"\xff\xd8\xff"


def _colorspace(components: int, ids: tuple[int, ...], jfif: bool, adobe_transform: int | None) -> str:
    if components == 1:
        return "Gray"
    if components == 3:
        if jfif:
            return "YCbCr"
        if adobe_transform is not None:
            return "RGB" if adobe_transform == 0 else "YCbCr"
        if ids == (0x52, 0x47, 0x42):  # 'R', 'G', 'B'
            return "RGB"
        return "YCbCr"
    if components == 4:
        return "YCCK" if adobe_transform == 2 else "CMYK"
    return "unknown"


def parse_jpeg(data: bytes) -> JpegInfo:
    """Check the structure of the JPEG stream ``data`` and return its :class:`JpegInfo`.

    Costs one pass over the bytes at C speed plus a few Python steps per marker segment (tens of
    microseconds for a typical photo). Raises :class:`JpegError` with the offset and the nature of the
    first defect (e.g. ``no end-of-image marker: the file ends inside the scan data (truncated)``).
    """
    n = len(data)
    if n < 2 or data[0] != 0xFF or data[1] != 0xD8:
        raise JpegError("no start-of-image marker (not a JPEG stream)", True)
    pos = 2
    frame = None  # (marker, precision, height, width, ids, quant table per id)
    quant_defined: set[int] = set()
    jfif, adobe_transform = False, None
    scans = 0
    mv = memoryview(data)

    def fail(message: str) -> JpegError:
        return JpegError(message, scans == 0)

    while True:
        if pos + 2 > n:
            if scans:
                raise fail(f"no end-of-image marker: the file ends at byte {n} after scan {scans} (truncated)")
            raise fail(f"the file ends at byte {n} before any image data (truncated)")
        if data[pos] != 0xFF:
            raise fail(f"expected a marker at byte {pos}, found 0x{data[pos]:02x} (garbage between segments)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            if not scans:
                raise fail(f"end-of-image marker at byte {pos} before any scan (no image data)")
            return JpegInfo(width=frame[3], height=frame[2], components=len(frame[4]), precision=frame[1],
                            frame=frame[0], colorspace=_colorspace(len(frame[4]), frame[4], jfif, adobe_transform),
                            scans=scans, end=pos + 2)
        if marker == 0x01:  # TEM: no length
            pos += 2
            continue
        if marker == 0x00 or marker == 0xD8 or 0xD0 <= marker <= 0xD7:
            what = {0x00: "a stuffed zero", 0xD8: "a second start-of-image"}.get(marker, "a restart marker")
            raise fail(f"unexpected marker 0xff{marker:02x} ({what}) at byte {pos}")
        if pos + 4 > n:
            raise fail(f"marker 0xff{marker:02x} at byte {pos} is cut off (truncated)")
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            raise fail(f"segment 0xff{marker:02x} at byte {pos} has an invalid length {length}")
        start, stop = pos + 4, pos + 2 + length
        if stop > n:
            raise fail(f"segment 0xff{marker:02x} at byte {pos} (length {length}) runs past the end of the "
                       f"file at byte {n} (truncated)")
        body = mv[start:stop]
        if marker in _FRAME_MARKERS:
            if frame is not None:
                raise fail(f"second frame header (0xff{marker:02x}) at byte {pos}")
            if length < 8:
                raise fail(f"frame header at byte {pos} is too short ({length} bytes)")
            precision, height, width, nf = body[0], (body[1] << 8) | body[2], (body[3] << 8) | body[4], body[5]
            if nf < 1 or length != 8 + 3 * nf:
                raise fail(f"frame header at byte {pos}: {nf} components do not fit its length {length}")
            if width == 0 or height == 0:
                raise fail(f"frame header at byte {pos} gives a size of {width}x{height} (a zero height "
                           f"defined later by DNL is not supported)")
            if precision not in (2, 8, 12, 16) and not (marker in _LOSSLESS and 2 <= precision <= 16):
                raise fail(f"frame header at byte {pos}: invalid sample precision {precision}")
            ids, tables = [], {}
            for c in range(nf):
                cid, hv, tq = body[6 + 3 * c], body[7 + 3 * c], body[8 + 3 * c]
                if not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4) or tq > 3:
                    raise fail(f"frame header at byte {pos}: component {cid} has invalid sampling factors "
                               f"0x{hv:02x} or quantisation table {tq}")
                if cid in tables:
                    raise fail(f"frame header at byte {pos}: component id {cid} appears twice")
                ids.append(cid)
                tables[cid] = tq
            frame = (marker, precision, height, width, tuple(ids), tables)
        elif marker == 0xDB:  # DQT: one or more tables of 64 bytes (8-bit) or 128 bytes (16-bit)
            i = 0
            while i < len(body):
                pq, tq = body[i] >> 4, body[i] & 15
                if pq > 1 or tq > 3:
                    raise fail(f"quantisation table segment at byte {pos}: invalid table 0x{body[i]:02x}")
                i += 1 + 64 * (pq + 1)
                quant_defined.add(tq)
            if i != len(body):
                raise fail(f"quantisation table segment at byte {pos}: length {length} does not match its tables")
        elif marker == 0xC4:  # DHT: class/id byte, 16 code counts, then the symbols
            i = 0
            while i < len(body):
                if i + 17 > len(body) or body[i] >> 4 > 1 or body[i] & 15 > 3:
                    raise fail(f"Huffman table segment at byte {pos}: malformed table at offset {i}")
                symbols = sum(body[i + 1:i + 17])
                if symbols > 256:
                    raise fail(f"Huffman table segment at byte {pos}: {symbols} codes (at most 256)")
                i += 17 + symbols
            if i != len(body):
                raise fail(f"Huffman table segment at byte {pos}: length {length} does not match its tables")
        elif marker == 0xDD:  # DRI
            if length != 4:
                raise fail(f"restart interval segment at byte {pos} has length {length}, expected 4")
        elif marker == 0xE0 and bytes(body[:5]) == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and bytes(body[:5]) == b"Adobe" and len(body) >= 12:
            adobe_transform = body[11]
        elif marker == 0xDA:  # SOS, followed by entropy-coded data
            if frame is None:
                raise fail(f"scan at byte {pos} before any frame header")
            ns = body[0] if len(body) else 0
            if not 1 <= ns <= 4 or length != 6 + 2 * ns:
                raise fail(f"scan header at byte {pos}: {ns} components do not fit its length {length}")
            for c in range(ns):
                cid = body[1 + 2 * c]
                if cid not in frame[5]:
                    raise fail(f"scan header at byte {pos} names component {cid}, which the frame lacks")
                if frame[5][cid] not in quant_defined:
                    raise fail(f"scan header at byte {pos}: quantisation table {frame[5][cid]} of component "
                               f"{cid} was never defined")
            ss, se, ah, al = body[1 + 2 * ns], body[2 + 2 * ns], body[3 + 2 * ns] >> 4, body[3 + 2 * ns] & 15
            if frame[0] in _PROGRESSIVE:
                bad = se > 63 or ss > se or (ss == 0 and se != 0) or (ss > 0 and ns != 1) or ah > 13 or al > 13
            elif frame[0] in _LOSSLESS:
                bad = not 1 <= ss <= 7 or se != 0 or ah != 0
            else:
                bad = ss != 0 or se != 63 or ah != 0 or al != 0
            if bad:
                raise fail(f"scan header at byte {pos}: spectral selection {ss}..{se} / approximation {ah},{al} "
                           f"is invalid for a {frame_name(frame[0])} frame")
            scans += 1
            found = _MARKER_IN_SCAN.search(data, stop)
            if found is None:
                raise fail(f"no end-of-image marker: the file ends inside the data of scan {scans} at byte {n} "
                           f"(truncated)")
            pos = found.start()
            following = data[pos + 1]
            if not (following in (0xD9, 0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xDA, 0xFE) or 0xE0 <= following <= 0xEF):
                raise fail(f"corrupt data in scan {scans}: marker 0xff{following:02x} at byte {pos} cannot "
                           f"follow scan data")
            continue
        pos = stop
