"""The HTTP/2 frame parser: splitting, padding, priority, CONTINUATION, size and placement errors."""

from __future__ import annotations

import random

import pytest

from osmo_router.h2 import frames as fr


def _all(parser: fr.FrameParser, data: bytes) -> list[tuple[int, int, int, bytes, int]]:
    return [(f.kind, f.flags, f.stream_id, bytes(f.payload), f.flow) for f in parser.feed(data)]


def test_frames_split_anywhere_come_out_whole() -> None:
    wire = fr.encode(fr.DATA, 0, 1, b"hello") + fr.encode(fr.PING, 0, 0, b"12345678")
    for cut in range(len(wire)):
        parser = fr.FrameParser()
        got = _all(parser, wire[:cut]) + _all(parser, wire[cut:])
        assert got == [(fr.DATA, 0, 1, b"hello", 5), (fr.PING, 0, 0, b"12345678", 8)]


def test_padding_and_priority_are_removed_but_padding_counts_for_flow() -> None:
    padded = fr.encode(fr.DATA, fr.PADDED, 1, bytes([3]) + b"abc" + b"\0\0\0")
    flags = fr.PADDED | fr.PRIORITY | fr.END_HEADERS
    headers = fr.encode(fr.HEADERS, flags, 1, bytes([2]) + b"\0" * 5 + b"hb" + b"\0\0")
    got = _all(fr.FrameParser(), padded + headers)
    assert got[0][3:] == (b"abc", 7)
    assert got[1][3] == b"hb"


def test_continuation_is_assembled_into_one_headers_frame() -> None:
    wire = (
        fr.encode(fr.HEADERS, fr.END_STREAM, 3, b"ab")
        + fr.encode(fr.CONTINUATION, 0, 3, b"cd")
        + fr.encode(fr.CONTINUATION, fr.END_HEADERS, 3, b"ef")
    )
    assert _all(fr.FrameParser(), wire) == [(fr.HEADERS, fr.END_STREAM | fr.END_HEADERS, 3, b"abcdef", 0)]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (fr.encode(fr.DATA, 0, 1, b"x" * 20), fr.ErrorCode.FRAME_SIZE_ERROR),  # over max_frame_size (16)
        (fr.encode(fr.DATA, 0, 0, b"x"), fr.ErrorCode.PROTOCOL_ERROR),  # DATA on stream 0
        (fr.encode(fr.PING, 0, 1, b"12345678"), fr.ErrorCode.PROTOCOL_ERROR),  # PING on a stream
        (fr.encode(fr.PING, 0, 0, b"1234"), fr.ErrorCode.FRAME_SIZE_ERROR),
        (fr.encode(fr.WINDOW_UPDATE, 0, 0, b"12"), fr.ErrorCode.FRAME_SIZE_ERROR),
        (fr.encode(fr.DATA, fr.PADDED, 1, bytes([9]) + b"ab"), fr.ErrorCode.PROTOCOL_ERROR),  # pad > payload
        (fr.encode(fr.CONTINUATION, fr.END_HEADERS, 1, b"ab"), fr.ErrorCode.PROTOCOL_ERROR),  # no HEADERS
        (fr.encode(fr.HEADERS, 0, 1, b"ab") + fr.encode(fr.DATA, 0, 1, b"x"), fr.ErrorCode.PROTOCOL_ERROR),
        (fr.encode(fr.SETTINGS, 0, 0, b"12345"), fr.ErrorCode.FRAME_SIZE_ERROR),
    ],
)
def test_bad_frames_are_connection_errors(wire: bytes, code: fr.ErrorCode) -> None:
    parser = fr.FrameParser(max_frame_size=16)
    with pytest.raises(fr.ProtocolError) as err:
        for frame in parser.feed(wire):
            if frame.kind == fr.SETTINGS:
                fr.decode_settings(frame.payload)
    assert err.value.code == code


def test_settings_values_are_checked() -> None:
    good = fr.encode_settings({fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20, fr.SETTINGS_MAX_FRAME_SIZE: 1 << 20})
    frame = next(fr.FrameParser().feed(good))
    assert fr.decode_settings(frame.payload) == [(4, 1 << 20), (5, 1 << 20)]
    bad = fr.encode_settings({fr.SETTINGS_MAX_FRAME_SIZE: 100})
    with pytest.raises(fr.ProtocolError):
        fr.decode_settings(next(fr.FrameParser().feed(bad)).payload)


def _parse_chunks(chunks: list[bytes | bytearray]) -> list[tuple[int, int, int, bytes, int]]:
    parser = fr.FrameParser()
    out: list[tuple[int, int, int, bytes, int]] = []
    for chunk in chunks:
        out.extend((f.kind, f.flags, f.stream_id, bytes(f.payload), f.flow) for f in parser.feed(chunk))
    return out


def test_frames_split_anywhere_parse_the_same_as_whole() -> None:
    # feed parses a chunk in place when nothing is left over and buffers otherwise: both must agree.
    rng = random.Random(1)
    frames = []
    for _ in range(300):
        kind = rng.choice([fr.DATA, fr.DATA, fr.PING, fr.WINDOW_UPDATE])
        if kind == fr.DATA:
            body = rng.randbytes(rng.randint(0, 300))
            stream_id = 1 + 2 * rng.randint(0, 3)
            if rng.random() < 0.3:
                pad = rng.randint(0, 10)
                frames.append(fr.encode(kind, fr.PADDED, stream_id, bytes([pad]) + body + b"\0" * pad))
            else:
                frames.append(fr.encode(kind, 0, stream_id, body))
        elif kind == fr.PING:
            frames.append(fr.encode(kind, 0, 0, b"12345678"))
        else:
            frames.append(fr.encode(kind, 0, 1, (5).to_bytes(4, "big")))
    blob = b"".join(frames)
    whole = _parse_chunks([blob])
    assert len(whole) == 300
    for trial in range(200):
        cuts = sorted(rng.sample(range(1, len(blob)), rng.randint(1, 80)))
        chunks: list[bytes | bytearray] = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
        if trial % 2:
            chunks = [bytearray(c) if rng.random() < 0.3 else c for c in chunks]
        assert _parse_chunks(chunks) == whole
