"""What a container's own framing says about a file's completeness, read from the bytes before decoding.

FFmpeg recomputes a cut-off WAV's or Ogg file's duration from what is there, so a truncated upload of
those decodes "cleanly" to half the speech. Their framing still tells: a WAV's data chunk declares its
size, and an Ogg stream marks its last page end-of-stream.
"""

from __future__ import annotations

import struct

# Data sizes writers put in a WAV header when they stream and cannot go back to fill it in.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)
_OGG_PAGE_HEADER = 27
_OGG_END_OF_STREAM = 0x04
_OGG_MAX_PAGE = _OGG_PAGE_HEADER + 255 + 255 * 255


def wav_missing_seconds(data: bytes) -> float | None:
    """Seconds of audio a WAV file's header declares beyond the bytes it holds; None if not a WAV with
    a known data size."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, byte_rate = 12, 0
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        body = offset + 8
        if chunk == b"fmt " and body + 12 <= len(data):
            byte_rate = struct.unpack_from("<I", data, body + 8)[0]
        elif chunk == b"data":
            if size in _UNKNOWN_WAV_SIZES or byte_rate == 0:
                return None
            return max(0, size - (len(data) - body)) / byte_rate
        offset = body + size + (size & 1)  # chunks are padded to an even length
    return None


def ogg_is_cut_off(data: bytes) -> bool:
    """Whether an Ogg file ends inside a page, or on a page that does not end its stream."""
    if data[:4] != b"OggS":
        return False
    last = data.rfind(b"OggS\x00", max(0, len(data) - _OGG_MAX_PAGE))
    if last < 0 or last + _OGG_PAGE_HEADER > len(data):
        return True
    segments = data[last + 26]
    table = data[last + _OGG_PAGE_HEADER : last + _OGG_PAGE_HEADER + segments]
    end = last + _OGG_PAGE_HEADER + segments + sum(table)
    return len(table) < segments or end != len(data) or not data[last + 5] & _OGG_END_OF_STREAM
