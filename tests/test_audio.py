"""Tests for audio.py: base64, decoding (soundfile and PyAV paths), encoding, speech helpers."""

from __future__ import annotations

import base64
import io
import struct
import tracemalloc

import av
import numpy as np
import pytest
import soundfile as sf

import audio
from audio import (
    OUTPUT_FORMATS,
    Audio,
    AudioError,
    active_speech_seconds,
    decode_audio,
    decode_base64,
    encode_audio,
    trim_silence,
)

SR = 24_000
FREQ = 440.0


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def sine(seconds: float = 1.5, sr: int = SR, freq: float = FREQ, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


def sf_bytes(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


class _NonSeekable:
    """Write-only sink: muxers cannot go back to write the duration."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, b: bytes) -> int:
        return self.buf.write(b)


def av_bytes(
    x: np.ndarray,
    sr: int,
    container: str,
    codec: str,
    *,
    bit_rate: int = 32_000,
    seekable: bool = True,
    chunk: int | None = None,
) -> bytes:
    """Encode (channels, n) or (n,) float32 with PyAV, feeding ``chunk`` samples per frame."""
    x = np.atleast_2d(x).astype(np.float32)
    layout = "mono" if x.shape[0] == 1 else "stereo"
    sink = io.BytesIO() if seekable else _NonSeekable()
    with av.open(sink, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=sr, layout=layout)
        stream.bit_rate = bit_rate
        step = chunk or x.shape[1]
        for start in range(0, x.shape[1], step):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(x[:, start : start + step]), format="fltp", layout=layout
            )
            frame.sample_rate = sr
            frame.pts = start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return sink.getvalue() if seekable else sink.buf.getvalue()


def silent_stream(seconds: int, sr: int, container: str, codec: str, **kw: bool) -> bytes:
    """A long silent file, encoded a minute at a time so the test never holds it all."""
    x = np.zeros(seconds * sr, np.float32)
    return av_bytes(x, sr, container, codec, chunk=60 * sr, bit_rate=8_000, **kw)


def assert_clean_message(exc: pytest.ExceptionInfo[AudioError]) -> None:
    msg = str(exc.value)
    assert msg
    assert "Traceback" not in msg and "BytesIO" not in msg and "/tmp" not in msg and "<" not in msg


# ---------------------------------------------------------------------------------------------
# decode_base64
# ---------------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 3 + b"\xfb\xff\xfe"  # contains bytes that give '+' '/' in base64


def test_base64_plain() -> None:
    assert decode_base64(base64.b64encode(PAYLOAD).decode()) == PAYLOAD


def test_base64_data_url_whitespace_and_missing_padding() -> None:
    enc = base64.b64encode(b"RIFF1").decode()  # 'UklGRjE=' : has padding
    assert enc.endswith("=")
    wrapped = "\n".join(enc.rstrip("=")[i : i + 3] for i in range(0, len(enc.rstrip("=")), 3))
    assert decode_base64(f"data:audio/wav;base64,{wrapped}\n") == b"RIFF1"
    assert decode_base64(f"  DATA:audio/x-wav;codecs=1;base64,{enc}") == b"RIFF1"


def test_base64_urlsafe() -> None:
    std = base64.b64encode(PAYLOAD).decode()
    urlsafe = base64.urlsafe_b64encode(PAYLOAD).decode().rstrip("=")
    assert ("+" in std or "/" in std) and ("-" in urlsafe or "_" in urlsafe)
    assert decode_base64(urlsafe) == PAYLOAD


@pytest.mark.parametrize("bad", ["not base64!!", "abcde", "QUJD=QUJD", "data:audio/wav,QUJD", "QU JD*"])
def test_base64_invalid(bad: str) -> None:
    with pytest.raises(AudioError, match="not valid base64") as exc:
        decode_base64(bad)
    assert_clean_message(exc)


@pytest.mark.parametrize("empty", ["", "   \n", "data:audio/wav;base64,"])
def test_base64_empty(empty: str) -> None:
    with pytest.raises(AudioError, match="empty"):
        decode_base64(empty)


def test_base64_max_bytes_checked_before_decoding() -> None:
    ok = base64.b64encode(b"x" * 1000).decode()
    assert len(decode_base64(ok, max_bytes=1000)) == 1000
    with pytest.raises(AudioError, match="MB"):
        decode_base64(ok, max_bytes=999)
    # Invalid characters, but far too big: the size is what is reported, so it was checked first.
    with pytest.raises(AudioError, match=r"larger than the 2 MB limit"):
        decode_base64("!" * (3 * 1024 * 1024), max_bytes=2 * 1024 * 1024)


# ---------------------------------------------------------------------------------------------
# encode -> decode round trips
# ---------------------------------------------------------------------------------------------

# AAC in ADTS cannot signal encoder delay: 1024 priming samples plus padding to a 1024 frame.
_EXTRA_SAMPLES = {"aac": 2048}


@pytest.mark.parametrize("fmt", sorted(OUTPUT_FORMATS))
def test_roundtrip_every_output_format(fmt: str) -> None:
    x = sine()
    data = encode_audio(Audio(x, SR), fmt)
    assert isinstance(data, bytes) and data
    if fmt in ("pcm", "pcm16"):
        assert len(data) == 2 * len(x)
        got = np.frombuffer(data, "<i2").astype(np.float32) / 32768
        rate = SR
    else:
        decoded = decode_audio(data)
        # libsndfile decodes Ogg Opus at the input rate stored in OpusHead, FFmpeg at 48 kHz.
        assert decoded.sample_rate in ((SR, 48_000) if fmt == "opus" else (SR,))
        decoded = decode_audio(data, target_rate=SR)
        assert decoded.sample_rate == SR
        assert decoded.samples.dtype == np.float32
        got, rate = decoded.samples, decoded.sample_rate
    extra = _EXTRA_SAMPLES.get(fmt, 0) / SR
    assert abs(len(got) / rate - 1.5) <= 0.05 * 1.5 + extra, (fmt, len(got) / rate)
    assert abs(dominant_freq(got, rate) - FREQ) < 5
    assert 0.4 < np.max(np.abs(got)) < 0.6


@pytest.mark.parametrize(
    ("fmt", "magic"),
    [
        ("wav", b"RIFF"),
        ("flac", b"fLaC"),
        ("opus", b"OggS"),
        ("aac", b"\xff"),
    ],
)
def test_encoded_container_magic(fmt: str, magic: bytes) -> None:
    data = encode_audio(Audio(sine(0.3), SR), fmt)
    assert data.startswith(magic)
    if fmt == "opus":
        assert b"OpusHead" in data[:200]
    if fmt == "aac":
        assert data[1] & 0xF6 == 0xF0  # ADTS sync + layer 0


def test_mp3_is_mpeg_audio() -> None:
    data = encode_audio(Audio(sine(0.3), SR), "mp3")
    assert data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    with av.open(io.BytesIO(data)) as c:
        assert c.streams.audio[0].codec_context.name.startswith("mp3")


def test_an_mp3_is_decoded_without_a_word_on_standard_error(capfd) -> None:
    """libsndfile's mp3 decoder (mpg123) wrote lines such as ``[src/libmpg123/layer3.c:...] error:
    part2_3_length (1088) too large for available bit count (736)`` straight to standard error, between the
    log's lines and without their time or request id, for mp3s that FFmpeg decodes without a complaint
    (a trial's 3-minute speech file made by ffmpeg: 26 lines). This one, speech at 22.05 kHz, made them."""
    from conftest import FIXTURES

    speech, rate = sf.read(FIXTURES / "speech_female.wav", dtype="float32")
    speech = np.tile(speech, 20)
    at = np.arange(int(len(speech) * 22050 / rate)) * rate / 22050
    data = av_bytes(np.interp(at, np.arange(len(speech)), speech), 22050, "mp3", "libmp3lame")
    capfd.readouterr()
    decoded = decode_audio(data)
    assert capfd.readouterr().err == ""
    assert decoded.sample_rate == 22050 and abs(decoded.duration - len(at) / 22050) < 0.1


def test_encode_clips_and_quantises() -> None:
    x = np.array([0.0, 2.0, -3.0, 0.5, -1.0, np.nan], np.float32)
    pcm = np.frombuffer(encode_audio(Audio(x, SR), "pcm16"), "<i2")
    assert pcm.tolist() == [0, 32767, -32767, 16384, -32767, 0]
    wav, rate = sf.read(io.BytesIO(encode_audio(Audio(x, SR), "wav")), dtype="int16")
    assert rate == SR and wav.tolist() == pcm.tolist()
    assert sf.info(io.BytesIO(encode_audio(Audio(x, SR), "wav"))).subtype == "PCM_16"


def test_encode_unknown_format() -> None:
    with pytest.raises(AudioError, match="unsupported output format"):
        encode_audio(Audio(sine(0.1), SR), "wma")


def test_opus_from_odd_rate_is_resampled() -> None:
    data = encode_audio(Audio(sine(1.0, sr=22_050), 22_050), "opus")
    decoded = decode_audio(data, target_rate=22_050)
    assert abs(decoded.duration - 1.0) < 0.05
    assert abs(dominant_freq(decoded.samples, 22_050) - FREQ) < 5


# ---------------------------------------------------------------------------------------------
# decoding inputs
# ---------------------------------------------------------------------------------------------


def _input(kind: str) -> bytes:
    x = sine()
    if kind == "wav":
        return sf_bytes(x, SR)
    if kind == "flac":
        return sf_bytes(x, SR, "FLAC")
    if kind == "ogg_vorbis":
        return sf_bytes(x, SR, "OGG", "VORBIS")
    if kind == "ogg_opus":
        return sf_bytes(x, SR, "OGG", "OPUS")
    if kind == "mp3":
        return sf_bytes(x, SR, "MP3", "MPEG_LAYER_III")
    if kind == "webm":
        return av_bytes(x, SR, "webm", "libopus")
    if kind == "m4a":
        return av_bytes(x, SR, "mp4", "aac", bit_rate=64_000)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["wav", "flac", "ogg_vorbis", "ogg_opus", "mp3", "webm", "m4a"])
def test_decode_input_formats(kind: str) -> None:
    decoded = decode_audio(_input(kind), target_rate=16_000)
    assert decoded.sample_rate == 16_000
    assert decoded.samples.dtype == np.float32 and decoded.samples.ndim == 1
    assert abs(decoded.duration - 1.5) < 0.05 * 1.5
    assert abs(dominant_freq(decoded.samples, 16_000) - FREQ) < 5
    assert np.max(np.abs(decoded.samples)) <= 1.0


def test_format_hint_is_optional_and_harmless() -> None:
    data = _input("m4a")
    a = decode_audio(data)
    b = decode_audio(data, format_hint="audio/mp4")
    assert a.sample_rate == b.sample_rate and np.array_equal(a.samples, b.samples)


def test_decode_is_deterministic() -> None:
    data = _input("mp3")
    a = decode_audio(data, target_rate=16_000)
    b = decode_audio(data, target_rate=16_000)
    assert np.array_equal(a.samples, b.samples)


def test_stereo_is_downmixed_by_mean_soundfile() -> None:
    x = sine(0.5)
    stereo = np.stack([x, np.zeros_like(x)], axis=1)
    decoded = decode_audio(sf_bytes(stereo, SR, subtype="FLOAT"))
    assert decoded.samples.ndim == 1 and len(decoded.samples) == len(x)
    np.testing.assert_allclose(decoded.samples, x / 2, atol=1e-6)


def test_stereo_is_downmixed_by_mean_pyav() -> None:
    x = sine(1.0)
    # L = sine, R = -sine: the mean is silence, whereas taking one channel would not be.
    data = av_bytes(np.stack([x, -x]), SR, "mp4", "aac", bit_rate=96_000)
    decoded = decode_audio(data)
    assert decoded.samples.ndim == 1
    assert np.max(np.abs(decoded.samples)) < 0.05
    # Same channels in phase: full sine survives.
    decoded = decode_audio(av_bytes(np.stack([x, x]), SR, "mp4", "aac", bit_rate=96_000))
    assert np.max(np.abs(decoded.samples)) > 0.4


def test_packed_pcm_through_pyav_path() -> None:
    # Interleaved int16 WAV forced through FFmpeg: a packed (non-planar) sample format.
    x = sine(0.5)
    stereo = np.stack([x, np.zeros_like(x)], axis=1)
    gathered = audio._decode_pyav(sf_bytes(stereo, SR, "WAV", "PCM_16"), None, "wav", audio._Gathered(None))
    samples, rate, _ = gathered.finish()
    assert rate == SR and samples.shape == (len(x),)
    np.testing.assert_allclose(samples, x / 2, atol=2e-4)


def test_float_overs_are_scaled_not_clipped() -> None:
    x = sine(0.2, amp=2.0)
    decoded = decode_audio(sf_bytes(x, SR, subtype="FLOAT"))
    assert np.max(np.abs(decoded.samples)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(decoded.samples, x / np.max(np.abs(x)), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def _refused(data: bytes, match: str, **kw: object) -> None:
    with pytest.raises(AudioError, match=match) as exc:
        decode_audio(data, **kw)
    assert_clean_message(exc)


def test_refuse_empty() -> None:
    _refused(b"", "empty")


@pytest.mark.parametrize(
    "junk",
    [
        np.random.default_rng(0).bytes(4096),
        b"this is a text file, not audio\n" * 20,
        b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk",
        b"fLaC" + b"\x00" * 100,
        b"OggS" + b"\x00" * 100,
    ],
)
def test_refuse_not_audio(junk: bytes) -> None:
    _refused(junk, r"could not be decoded as audio; send wav, mp3, flac, ogg, opus, webm, m4a or aac")


@pytest.mark.parametrize(("tag", "bits"), [(3, 16), (3, 24), (1, 0), (0xFFFF, 16)])
def test_refuse_a_wav_header_ffmpeg_makes_no_decoder_for(tag: int, bits: int) -> None:
    """A hostile-input trial: a float WAV of 16 bits (and 3 more such headers) failed every audio endpoint
    with a 500 and a traceback: FFmpeg gives such a stream no codec context."""
    body = b"\x10\x00" * 16_000
    fmt = struct.pack("<HHIIHH", tag, 1, 16_000, 32_000, 2, bits)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(body)) + body
    _refused(b"RIFF" + struct.pack("<I", len(riff)) + riff, "could not be decoded as audio")


def test_refuse_header_only_wav() -> None:
    data = sf_bytes(np.zeros(0, np.int16), SR)
    assert len(data) <= 100
    _refused(data, "no samples")


def test_refuse_nan_and_inf() -> None:
    for bad in (np.nan, np.inf, -np.inf):
        x = sine(0.1)
        x[100] = bad
        _refused(sf_bytes(x, SR, subtype="FLOAT"), "NaN or infinity")


def test_refuse_too_many_channels() -> None:
    _refused(sf_bytes(np.zeros((100, 32), np.int16), SR), "32 channels; at most 16")
    assert decode_audio(sf_bytes(np.zeros((100, 16), np.int16) + 100, SR)).sample_rate == SR


@pytest.mark.parametrize("rate", [500, 999, 384_001, 400_000])
def test_refuse_sample_rate(rate: int) -> None:
    _refused(sf_bytes(np.full(100, 0.1, np.float32), rate), f"{rate} Hz is not supported")


def test_accept_edge_sample_rates() -> None:
    for rate in (1000, 384_000):
        assert decode_audio(sf_bytes(np.full(2000, 0.1, np.float32), rate)).sample_rate == rate


def _refused_cheaply(data: bytes, max_seconds: float, max_peak_mb: float) -> str:
    """Refused with a memory peak far below what decoding it all takes (so, before decoding it)."""
    tracemalloc.start()
    try:
        with pytest.raises(AudioError) as exc:
            decode_audio(data, max_seconds=max_seconds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{max_seconds:g} s limit" in str(exc.value)
    assert peak < max_peak_mb * 1e6, peak
    return str(exc.value)


def test_refuse_long_flac_from_header() -> None:
    # One hour of silence: 90 kB of FLAC, 115 MB once decoded at 8 kHz float32.
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros(8000 * 60, np.int16)
        for _ in range(60):
            f.write(block)
    data = buf.getvalue()
    assert len(data) < 1_000_000
    msg = _refused_cheaply(data, 60, max_peak_mb=2)
    assert "3600" in msg


def test_refuse_long_mp3_from_header() -> None:
    data = silent_stream(600, 8000, "mp3", "libmp3lame")
    _refused_cheaply(data, 30, max_peak_mb=2)


@pytest.mark.parametrize(("container", "codec"), [("mp4", "aac"), ("webm", "libopus")])
def test_refuse_long_pyav_from_header(container: str, codec: str) -> None:
    data = silent_stream(600 if codec == "aac" else 240, 8000, container, codec)
    _refused_cheaply(data, 30, max_peak_mb=2)


def test_refuse_long_stream_without_duration_stops_early() -> None:
    # A live-style Matroska (written to a non-seekable sink) has no duration in its header.
    x = np.zeros(16000 * 120, np.float32)
    data = av_bytes(x, 16000, "matroska", "aac", seekable=False, chunk=16000 * 60)
    with av.open(io.BytesIO(data)) as c:
        assert c.duration is None and c.streams.audio[0].duration is None
    # Decoding all 120 s needs about 15 MB (16 kHz float32, plus the concatenation); stopping
    # at the 20 s limit needs a fraction of that.
    _refused_cheaply(data, 20, max_peak_mb=5)
    # ... and a limit above the real length accepts it.
    assert abs(decode_audio(data, max_seconds=130).duration - 120) < 0.5


@pytest.mark.parametrize(("container", "codec"), [("mp3", "libmp3lame"), ("adts", "aac")])
def test_estimated_duration_limit_enforced_while_decoding(container: str, codec: str) -> None:
    # mp3 goes through libsndfile, raw ADTS through FFmpeg; both only estimate the length,
    # so the header is not trusted near the limit and the decoded length decides.
    data = silent_stream(40, 8000, container, codec)
    _refused(data, r"longer than the 30 s limit", max_seconds=30)
    assert abs(decode_audio(data, max_seconds=45).duration - 40) < 0.5


def test_duration_limit_boundary() -> None:
    data = sf_bytes(sine(2.0), SR)
    assert decode_audio(data, max_seconds=2.0).duration == pytest.approx(2.0)
    _refused(data, r"longer than the 1\.5 s limit", max_seconds=1.5)


# ---------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------


def test_resample_16k_to_24k() -> None:
    x = sine(1.0, sr=16_000)
    decoded = decode_audio(sf_bytes(x, 16_000), target_rate=24_000)
    assert decoded.sample_rate == 24_000
    assert len(decoded.samples) == 24_000
    assert abs(dominant_freq(decoded.samples, 24_000) - FREQ) < 2
    # Good resampler: the middle matches an ideal 24 kHz sine closely.
    ref = sine(1.0, sr=24_000)
    np.testing.assert_allclose(decoded.samples[1000:-1000], ref[1000:-1000], atol=2e-3)


def test_resample_24k_to_16k() -> None:
    tone = np.sin(2 * np.pi * 440 * np.arange(24_000) / 24_000).astype(np.float32)
    out = audio.resample(tone, 24_000, 16_000)
    assert out.dtype == np.float32 and out.shape == (16_000,)
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 16_000 / len(out)
    assert abs(peak_hz - 440) <= 2
    same = np.zeros(100, np.float32)
    assert audio.resample(same, 16_000, 16_000).shape == (100,)


def test_resample_awkward_ratio_uses_bounded_path() -> None:
    x = sine(1.0, sr=44_099)
    out = audio.resample(x, 44_099, 24_000)
    assert len(out) == 24_000
    assert abs(dominant_freq(out, 24_000) - FREQ) < 2


def test_resample_downsampling_removes_aliases() -> None:
    # 10 kHz tone at 48 kHz is above Nyquist at 16 kHz: it must be filtered out, not folded.
    x = sine(1.0, sr=48_000, freq=10_000)
    out = audio.resample(x, 48_000, 16_000)
    assert len(out) == 16_000
    assert np.sqrt(np.mean(out[500:-500] ** 2)) < 0.01


@pytest.mark.parametrize(
    ("rate", "target", "kind"),
    [(44_100, 16_000, "WAV"), (48_000, 24_000, "FLAC"), (384_000, 16_000, "WAV"), (8_000, 16_000, "WAV"),
     (22_050, 24_000, "FLAC"), (44_099, 16_000, "WAV"), (48_000, 16_000, "mp3")],
)  # fmt: skip
def test_a_long_clip_resampled_block_by_block_is_the_clip_resampled_at_once(rate, target, kind) -> None:
    """A clip is resampled a block at a time as it is decoded (its samples at the source's rate were all
    held, then resampled at once: gigabytes for a small file at 384 kHz); the result is the same but for
    float rounding (a convolution of another length sums in another order), across every join."""
    seconds = 2.5 * audio._BLOCK_SAMPLES / rate + 0.37  # three blocks, the last one short
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 97 * t * (1 + t / 60))).astype(
        np.float32
    )
    data = (
        av_bytes(x, rate, "mp3", "libmp3lame")
        if kind == "mp3"
        else sf_bytes(x, rate, kind, "FLOAT" if kind == "WAV" else None)
    )
    native = decode_audio(data)
    whole = audio.resample(native.samples, native.sample_rate, target)
    blocks = decode_audio(data, target_rate=target)
    assert blocks.sample_rate == target and len(blocks.samples) == len(whole)
    assert np.max(np.abs(blocks.samples - whole)) < 2e-5, np.max(np.abs(blocks.samples - whole))


def test_a_long_high_rate_clip_is_decoded_in_bounded_memory() -> None:
    """A hostile-input trial: 30 minutes of 384 kHz FLAC silence is 2.6 MB, and decoding it for speech
    recognition took the server from 1.9 to 8.2 GB. Now the memory a decode holds at its peak grows with
    the 16 kHz result, not with the source: a clip twice as long peaks at about the same."""
    rate = 384_000

    def peak_of(seconds: int) -> int:
        buffer = io.BytesIO()
        with sf.SoundFile(buffer, "w", rate, 1, format="FLAC") as f:
            for _ in range(seconds):
                f.write(np.zeros(rate, np.int16))
        tracemalloc.start()
        try:
            decoded = decode_audio(buffer.getvalue(), target_rate=16_000)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert decoded.sample_rate == 16_000 and len(decoded.samples) == seconds * 16_000
        return peak

    seconds = 6 * audio._BLOCK_SAMPLES // rate  # (33 s: six blocks)
    once, twice = peak_of(seconds), peak_of(2 * seconds)
    result = seconds * 16_000 * 4  # the longer clip's extra float32 samples at 16 kHz
    assert twice < once + 2 * result, (once, twice)  # (whole, the longer held twice the native samples)
    assert twice < 2 * seconds * rate * 4 / 2, twice  # (under half the native samples a whole decode held)


# ---------------------------------------------------------------------------------------------
# speech helpers
# ---------------------------------------------------------------------------------------------


def _tone_in_silence(sr: int = SR) -> Audio:
    z = np.zeros(sr, np.float32)
    return Audio(np.concatenate([z, sine(1.0, sr=sr), z]), sr)


def test_active_speech_seconds() -> None:
    assert active_speech_seconds(Audio(np.zeros(SR, np.float32), SR)) == 0.0
    assert active_speech_seconds(Audio(np.zeros(0, np.float32), SR)) == 0.0
    # Quiet noise (-70 dBFS) is below the absolute floor even though it is its own peak.
    noise = (np.random.default_rng(1).standard_normal(SR) * 10 ** (-70 / 20)).astype(np.float32)
    assert active_speech_seconds(Audio(noise, SR)) == 0.0
    assert active_speech_seconds(_tone_in_silence()) == pytest.approx(1.0, abs=0.04)
    assert active_speech_seconds(_tone_in_silence(16_000)) == pytest.approx(1.0, abs=0.04)
    assert active_speech_seconds(Audio(sine(2.0), SR)) == pytest.approx(2.0, abs=0.04)


def test_active_speech_relative_threshold() -> None:
    # A murmur 45 dB below a loud tone (but above the -60 dBFS floor) does not count at -40 dB,
    # and does at -55 dB.
    loud = sine(1.0, amp=0.9)
    quiet = sine(1.0, amp=0.9 * 10 ** (-45 / 20))
    a = Audio(np.concatenate([quiet, loud]), SR)
    assert active_speech_seconds(a) == pytest.approx(1.0, abs=0.04)
    assert active_speech_seconds(a, threshold_db=-55.0) == pytest.approx(2.0, abs=0.04)


def test_trim_silence() -> None:
    clip = _tone_in_silence()
    trimmed = trim_silence(clip)
    assert trimmed.sample_rate == SR
    assert trimmed.duration == pytest.approx(1.2, abs=0.03)
    head = trimmed.samples[: int(0.08 * SR)]
    assert np.max(np.abs(head)) == 0.0  # padding kept as silence
    assert np.max(np.abs(trimmed.samples[int(0.12 * SR) : int(0.2 * SR)])) > 0.4
    assert trim_silence(clip, pad_seconds=0.0).duration == pytest.approx(1.0, abs=0.03)
    silent = Audio(np.zeros(SR, np.float32), SR)
    assert trim_silence(silent) is silent
