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

WAV files as shards, and back (the code of dev/data/audio.py; `python -m pyllmc.audio` from an
installed copy):
    write_shards(["wavs/"], "data/audio")   # audio_val_000000.bin, audio_train_000001.bin, ..., audio_manifest.json
    decode_shard("data/audio/audio_val_000000.bin", "val.wav")
Every .wav file given (folders are searched recursively, in sorted path order) is read (read_wav:
mono, resampled to sample_rate) and mu-law encoded. The last val_fraction of each file goes to the
validation shard, the rest, files concatenated in order, to training shards of about shard_size
tokens. The manifest records each shard's token count, sha256 and largest id (pyllmc.data), the files
and their lengths, and the tokenizer {"name": "mulaw", "sample_rate": ...}, so train_gpt2.py writes
its samples as .wav files. dtype "uint32" writes llm.c's version-7 shards instead of version 1
(uint16); both hold the codes. Without an output folder the shards go to pyllmc's user cache, never
the source tree (pyllmc.corpus.cache_dir: $PYLLMC_CACHE_DIR, else $XDG_CACHE_HOME/pyllmc, else
~/.cache/pyllmc):
    <cache>/data/audio-<first file's name>-<12 hex digits of the files' names and sizes>/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import wave
from pathlib import Path
from typing import Callable

import numpy as np

from pyllmc import tokenizer as _tokenizer
from pyllmc.corpus import data_cache_dir
from pyllmc.data import MANIFEST_SUFFIX, declared_tokenizer, read_shard, write_shard_entry

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


# ---------------------------------------------------------------------------------------------
# WAV files as shards, and back (dev/data/audio.py)

PREFIX = "audio"  # audio_val_000000.bin, audio_train_000001.bin, ..., audio_manifest.json
SHARD_SIZE = 10_000_000  # tokens (samples) per train shard, about
VAL_FRACTION = 0.1


def list_wavs(paths) -> list[Path]:
    """The .wav files among `paths`, folders searched recursively in sorted path order; ValueError for a
    path that does not exist or a folder without any."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".wav"),
                           key=lambda p: p.as_posix())
            if not found:
                raise ValueError(f"no .wav files in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"input {path} does not exist")
    return files


def encode_files(files, sample_rate: int = SAMPLE_RATE, val_fraction: float = VAL_FRACTION,
                 say: Callable[[str], None] = print):
    """(val codes, train codes, per-file records): each file's last val_fraction goes to val."""
    val, train, records = [], [], []
    for f in files:
        codes = mulaw_encode(read_wav(f, sample_rate))
        n_val = int(round(len(codes) * val_fraction))
        val.append(codes[len(codes) - n_val:])
        train.append(codes[: len(codes) - n_val])
        records.append({"file": str(f), "samples": int(len(codes)), "seconds": round(len(codes) / sample_rate, 3),
                        "val_samples": n_val})
        say(f"{f}: {len(codes) / sample_rate:.2f} s at {sample_rate} Hz, {n_val} samples to val")
    return np.concatenate(val), np.concatenate(train), records


def default_output_dir(files) -> Path:
    """<cache>/data/audio-<first file's name>-<12 hex digits of the files' names and sizes> (like
    pyllmc.fineweb's folders for local input)."""
    files = [Path(f) for f in files]
    described = json.dumps({"files": [[f.name, f.stat().st_size] for f in files]})
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", files[0].stem)[:40] or "input"
    return data_cache_dir() / f"{PREFIX}-{stem}-{hashlib.sha256(described.encode()).hexdigest()[:12]}"


def write_shards(inputs, output_dir=None, sample_rate: int = SAMPLE_RATE, val_fraction: float = VAL_FRACTION,
                 shard_size: int = SHARD_SIZE, dtype: str = "uint16", say: Callable[[str], None] = print) -> Path:
    """WAV files (and folders of them) as mu-law shards with a manifest, in output_dir (None: the user
    cache, default_output_dir); returns the folder. Earlier audio_* shards there are replaced. ValueError
    on bad arguments, unreadable files or too little audio; ImportError without SciPy."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if sample_rate <= 0 or shard_size <= 0:
        raise ValueError(f"sample_rate and shard_size must be positive, got {sample_rate} and {shard_size}")
    files = list_wavs(inputs)
    val, train, records = encode_files(files, sample_rate, val_fraction, say)
    if val.size == 0 or train.size == 0:
        raise ValueError(f"too little audio ({val.size + train.size} samples) for a validation and a training split")
    out = default_output_dir(files) if output_dir is None else Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / f"{PREFIX}{MANIFEST_SUFFIX}"
    manifest_path.unlink(missing_ok=True)  # no stale records beside new shards, even after a crash
    for old in out.glob(f"{PREFIX}_*.bin"):  # no stale shards from an earlier run beside the new ones
        old.unlink()
    parts = [("val", val)] + [("train", part) for part in
                              np.array_split(train, max(1, -(-train.size // shard_size)))]
    shards = []
    for index, (split, codes) in enumerate(parts):
        path = out / f"{PREFIX}_{split}_{index:06d}.bin"
        shards.append(write_shard_entry(path, codes, dtype=dtype))
        say(f"wrote {codes.size:,} tokens ({codes.size / sample_rate:.2f} s) to {path}")
    manifest = {"config": {"source": "wav", "sample_rate": sample_rate, "val_fraction": val_fraction,
                           "dtype": dtype, "files": records},
                "tokenizer": MuLawTokenizer(sample_rate).spec(), "complete": True, "shards": shards}
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)
    return out


def decode_shard(shard, output, start: int = 0, length: int = -1, sample_rate: int = 0) -> tuple[Path, int, int]:
    """The codes of a shard (or `length` of them from `start`; -1: to the end) as a 16-bit mono WAV file at
    sample_rate (0: the rate the shard's manifest records); returns (the file, samples, rate). ValueError
    when the shard is not mu-law audio."""
    codes = read_shard(shard)
    spec, _ = declared_tokenizer([shard])
    if spec is not None and spec["name"] != "mulaw":
        raise ValueError(f"{shard} holds tokens of tokenizer {spec['name']!r}, not mu-law audio")
    tokenizer = _tokenizer.from_spec(spec) if spec is not None else MuLawTokenizer()
    rate = sample_rate or tokenizer.sample_rate
    end = len(codes) if length < 0 else start + length
    try:
        samples = tokenizer.decode(np.asarray(codes[start:end]))
    except ValueError as e:  # an id past 255: not mu-law codes
        raise ValueError(f"{shard}: {e}") from e
    return write_wav(output, samples, rate), len(samples), rate


def _encode_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="audio.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="WAV files and/or folders of them")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="where the shards go (default: pyllmc's user cache, <cache>/data/audio-<name>-<hash>)")
    parser.add_argument("--sample_rate", type=int, default=SAMPLE_RATE, help="resample to this rate (Hz)")
    parser.add_argument("--val_fraction", type=float, default=VAL_FRACTION,
                        help="the end of each file that goes to val")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="tokens (samples) per train shard, about")
    parser.add_argument("--dtype", choices=["uint16", "uint32"], default="uint16",
                        help="uint16: llm.c's version-1 shards; uint32: its version-7 shards")
    args = parser.parse_args(argv)
    try:
        out = write_shards(args.input, args.output_dir, args.sample_rate, args.val_fraction, args.shard_size,
                           args.dtype)
    except (ValueError, ImportError) as e:
        sys.exit(str(e))
    print(f"train: python train_gpt2.py --input_bin '{out}/{PREFIX}_train_*.bin' --input_val_bin "
          f"'{out}/{PREFIX}_val_*.bin' --vocab_size 256 --output_dir out_audio")


def _decode_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="audio.py decode", description="mu-law codes of a shard -> a WAV file")
    parser.add_argument("shard", type=Path)
    parser.add_argument("--output", type=Path, required=True, help="the .wav file to write")
    parser.add_argument("--start", type=int, default=0, help="first code to decode")
    parser.add_argument("--length", type=int, default=-1, help="codes to decode (-1: to the end)")
    parser.add_argument("--sample_rate", type=int, default=0, help="0: the rate the shard's manifest records")
    args = parser.parse_args(argv)
    try:
        path, n, rate = decode_shard(args.shard, args.output, args.start, args.length, args.sample_rate)
    except ValueError as e:
        sys.exit(str(e))
    print(f"wrote {n:,} samples ({n / rate:.2f} s at {rate} Hz) to {path}")


def main(argv=None) -> None:
    """The command line of dev/data/audio.py (python -m pyllmc.audio): encode by default, `decode SHARD`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "decode":
        return _decode_main(argv[1:])
    return _encode_main(argv)


if __name__ == "__main__":
    main()
