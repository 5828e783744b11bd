"""Audio as tokens: 8-bit mu-law codes (WaveNet's quantization), read from and written to WAV.

    x = read_wav("take.wav")                # float32 mono in [-1, 1] at 16 kHz (mixed down, resampled)
    codes = mulaw_encode(x)                 # uint8, 256 levels: the tokens
    y = mulaw_decode(codes)                 # float32: x within mu-law's quantization error
    write_wav("out.wav", y, 16000)          # 16-bit PCM
    tok = MuLawTokenizer(16000)             # the tokenizer a manifest declares: samples become .wav files

Mu-law (ITU-T G.711's curve, WaveNet's 256-level quantization, mu = 255): a sample x in [-1, 1] is
companded to f = sign(x) ln(1 + mu |x|) / ln(1 + mu), then f in [-1, 1] is rounded to one of 256 evenly
spaced levels, code = round((f + 1) / 2 * mu). The levels are dense near 0 and sparse near +-1, so the
error is small where speech and music spend their time: at most half a level's width, which is
mulaw_error_bound(x). Code 128 is (nearly) silence.

Reading WAV files and resampling need SciPy (the `audio` extra: pip install "pyllmc[audio]"):
scipy.io.wavfile reads PCM (8/16/24/32-bit) and float WAV files, and scipy.signal.resample_poly
resamples with a polyphase anti-aliasing filter. Writing needs only the standard library's `wave`,
so a trainer writes its audio samples without the extra.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

from pyllmc import tokenizer as _tokenizer

MU = 255
LEVELS = MU + 1  # 256 tokens
SILENCE = 128  # the code of 0.0
SAMPLE_RATE = 16000


def mulaw_encode(x, mu: int = MU) -> np.ndarray:
    """Samples in [-1, 1] (clipped) -> uint8 codes 0..mu."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    f = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    return np.floor((f + 1.0) / 2.0 * mu + 0.5).astype(np.uint8)


def mulaw_decode(codes, mu: int = MU) -> np.ndarray:
    """uint8 codes (or any array of ids in 0..mu; fractional codes interpolate the curve) -> float32
    samples in [-1, 1]."""
    f = 2.0 * np.asarray(codes, dtype=np.float64) / mu - 1.0
    return (np.sign(f) * np.expm1(np.abs(f) * math.log1p(mu)) / mu).astype(np.float32)


def mulaw_error_bound(x, mu: int = MU) -> np.ndarray:
    """The largest |x - mulaw_decode(mulaw_encode(x))| the quantization allows at each sample: half a
    level's width on either side of x's code (in float64, before the float32 rounding of the decode)."""
    code = mulaw_encode(x, mu).astype(np.float64)
    center = mulaw_decode(code, mu).astype(np.float64)
    up = np.abs(mulaw_decode(np.minimum(code + 0.5, mu), mu).astype(np.float64) - center)
    down = np.abs(center - mulaw_decode(np.maximum(code - 0.5, 0), mu).astype(np.float64))
    return np.maximum(up, down)


def _scipy():
    try:
        from scipy.io import wavfile
        from scipy.signal import resample_poly
    except ImportError as e:
        raise ImportError("reading WAV files needs SciPy: pip install \"pyllmc[audio]\" (or pip install scipy)") from e
    return wavfile, resample_poly


def to_float(data: np.ndarray, path="") -> np.ndarray:
    """WAV sample data (any of the dtypes scipy.io.wavfile returns) -> float32 in [-1, 1]."""
    if data.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        return ((data.astype(np.float32) - 128.0) / 128.0)
    if data.dtype == np.int16:
        return data.astype(np.float32) / 32768.0
    if data.dtype == np.int32:  # 32-bit, and 24-bit (scipy puts it in the high 3 bytes)
        return (data.astype(np.float64) / 2**31).astype(np.float32)
    if data.dtype == np.int64:
        return (data.astype(np.float64) / 2**63).astype(np.float32)
    if np.issubdtype(data.dtype, np.floating):
        return np.clip(data.astype(np.float32), -1.0, 1.0)
    raise ValueError(f"{path}: WAV samples of type {data.dtype} are not supported")


def read_wav(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A WAV file as float32 mono samples in [-1, 1] at `sample_rate`: channels are averaged, the rate
    is converted with scipy.signal.resample_poly. ValueError naming the file when it is not a WAV."""
    wavfile, resample_poly = _scipy()
    path = Path(path)
    try:
        rate, data = wavfile.read(path)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable WAV file ({type(e).__name__}: {e})") from e
    x = to_float(np.asarray(data), path)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float64).astype(np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{path}: no audio samples (shape {np.shape(data)})")
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        x = resample_poly(x.astype(np.float64), sample_rate // g, int(rate) // g).astype(np.float32)
    return np.clip(x, -1.0, 1.0)


def write_wav(path, samples, sample_rate: int = SAMPLE_RATE) -> Path:
    """float samples in [-1, 1] (clipped) -> a mono 16-bit PCM WAV file (standard library only)."""
    path = Path(path)
    pcm = np.round(np.clip(np.asarray(samples, dtype=np.float64), -1.0, 1.0) * 32767).astype("<i2")
    tmp = path.with_name(f".{path.name}.tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    tmp.replace(path)
    return path


class MuLawTokenizer(_tokenizer.Tokenizer):
    """256 mu-law codes of mono audio at `sample_rate`; samples are written as WAV files."""

    name = "mulaw"
    vocab_size = LEVELS
    eot = None
    modality = "audio"

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"mulaw: sample_rate must be a positive int, got {sample_rate!r}")
        self.sample_rate = sample_rate

    def spec(self) -> dict:
        return {"name": self.name, "sample_rate": self.sample_rate}

    @property
    def label(self) -> str:
        return f"mulaw-{self.sample_rate}hz"

    def describe(self) -> str:
        return f"{self.label} (256 8-bit mu-law codes of {self.sample_rate:,} Hz mono audio)"

    @property
    def start_token(self) -> int:
        return SILENCE

    def encode(self, samples) -> list[int]:
        """float samples in [-1, 1] -> codes (audio, not text: see read_wav for files)."""
        return mulaw_encode(samples).tolist()

    def decode(self, ids) -> np.ndarray:
        """codes -> float32 samples."""
        return mulaw_decode(self.check_ids(ids))

    def write_sample(self, ids, path) -> Path:
        """codes -> a WAV file at this tokenizer's sample rate."""
        return write_wav(path, self.decode(ids), self.sample_rate)


_tokenizer.register("mulaw", lambda spec: MuLawTokenizer(int(spec.get("sample_rate", SAMPLE_RATE))))
