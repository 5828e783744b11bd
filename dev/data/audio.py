"""WAV files as llm.c token shards of 8-bit mu-law codes (256 tokens), and back.

"Swap text for audio": a GPT trained on these shards models sound one sample at a time, as
WaveNet does, with the same trainer (train_gpt2.py --vocab_size 256).

    python dev/data/audio.py --input FILES_OR_DIRS [--output_dir DIR] [--sample_rate 16000]
    python dev/data/audio.py decode DIR/audio_val_000000.bin --output val.wav

Encoding: every .wav file given (folders are searched recursively, in sorted path order) is read
with SciPy (pip install "pyllmc[audio]"), mixed down to mono (the channels' mean), resampled to
--sample_rate (scipy.signal.resample_poly) and mu-law encoded (pyllmc.audio: 256 levels, mu =
255). The last --val_fraction of each file goes to the validation shard, the rest, files
concatenated in order, to training shards of about --shard_size tokens:
    <output_dir>/audio_val_000000.bin, audio_train_000001.bin, ...
    <output_dir>/audio_manifest.json   each shard's token count and sha256, the files and their
                                       lengths, and the tokenizer {"name": "mulaw", "sample_rate": ...},
                                       so train_gpt2.py writes its samples as .wav files
--dtype uint32 writes llm.c's version-7 shards instead of version 1 (uint16); both hold the codes.

Decoding: the codes of a shard (or --start/--length of them) back to a 16-bit mono WAV at the
sample rate its manifest records.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pyllmc import audio
from pyllmc.data import MANIFEST_SUFFIX, declared_tokenizer, read_shard, write_shard
from pyllmc.tokenizer import from_spec

PREFIX = "audio"


def list_wavs(paths) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".wav"),
                           key=lambda p: p.as_posix())
            if not found:
                sys.exit(f"no .wav files in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            sys.exit(f"input {path} does not exist")
    return files


def encode_files(files, sample_rate: int, val_fraction: float):
    """(val codes, train codes, per-file records): each file's last val_fraction goes to val."""
    val, train, records = [], [], []
    for f in files:
        try:
            x = audio.read_wav(f, sample_rate)
        except (ValueError, ImportError) as e:
            sys.exit(str(e))
        codes = audio.mulaw_encode(x)
        n_val = int(round(len(codes) * val_fraction))
        val.append(codes[len(codes) - n_val:])
        train.append(codes[: len(codes) - n_val])
        records.append({"file": str(f), "samples": int(len(codes)), "seconds": round(len(codes) / sample_rate, 3),
                        "val_samples": n_val})
        print(f"{f}: {len(codes) / sample_rate:.2f} s at {sample_rate} Hz, {n_val} samples to val")
    return np.concatenate(val), np.concatenate(train), records


def encode_main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="WAV files and/or folders of them")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).parent / "audio",
                        help="where the shards go (default: dev/data/audio/)")
    parser.add_argument("--sample_rate", type=int, default=audio.SAMPLE_RATE, help="resample to this rate (Hz)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the end of each file that goes to val")
    parser.add_argument("--shard_size", type=int, default=10_000_000, help="tokens (samples) per train shard, about")
    parser.add_argument("--dtype", choices=["uint16", "uint32"], default="uint16",
                        help="uint16: llm.c's version-1 shards; uint32: its version-7 shards")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        sys.exit(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    if args.sample_rate <= 0 or args.shard_size <= 0:
        sys.exit("--sample_rate and --shard_size must be positive")

    files = list_wavs(args.input)
    val, train, records = encode_files(files, args.sample_rate, args.val_fraction)
    if val.size == 0 or train.size == 0:
        sys.exit(f"too little audio ({val.size + train.size} samples) for a validation and a training split")
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / f"{PREFIX}{MANIFEST_SUFFIX}"
    manifest_path.unlink(missing_ok=True)
    for old in out.glob(f"{PREFIX}_*.bin"):  # no stale shards from an earlier run beside the new ones
        old.unlink()
    parts = [("val", val)] + [("train", part) for part in
                              np.array_split(train, max(1, -(-train.size // args.shard_size)))]
    shards = []
    for index, (split, codes) in enumerate(parts):
        path = out / f"{PREFIX}_{split}_{index:06d}.bin"
        shards.append({"file": path.name, "tokens": int(codes.size),
                       "sha256": write_shard(path, codes, dtype=args.dtype)})
        print(f"wrote {codes.size:,} tokens ({codes.size / args.sample_rate:.2f} s) to {path}")
    tokenizer = audio.MuLawTokenizer(args.sample_rate)
    manifest = {"config": {"source": "wav", "sample_rate": args.sample_rate, "val_fraction": args.val_fraction,
                           "dtype": args.dtype, "files": records},
                "tokenizer": tokenizer.spec(), "complete": True, "shards": shards}
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)
    print(f"train: python train_gpt2.py --input_bin '{out}/{PREFIX}_train_*.bin' --input_val_bin "
          f"'{out}/{PREFIX}_val_*.bin' --vocab_size 256 --output_dir out_audio")


def decode_main(argv):
    parser = argparse.ArgumentParser(prog="audio.py decode", description="mu-law codes of a shard -> a WAV file")
    parser.add_argument("shard", type=Path)
    parser.add_argument("--output", type=Path, required=True, help="the .wav file to write")
    parser.add_argument("--start", type=int, default=0, help="first code to decode")
    parser.add_argument("--length", type=int, default=-1, help="codes to decode (-1: to the end)")
    parser.add_argument("--sample_rate", type=int, default=0, help="0: the rate the shard's manifest records")
    args = parser.parse_args(argv)
    try:
        codes = read_shard(args.shard)
        spec, _ = declared_tokenizer([args.shard])
    except ValueError as e:
        sys.exit(str(e))
    if spec is not None and spec["name"] != "mulaw":
        sys.exit(f"{args.shard} holds tokens of tokenizer {spec['name']!r}, not mu-law audio")
    tokenizer = from_spec(spec) if spec is not None else audio.MuLawTokenizer()
    rate = args.sample_rate or tokenizer.sample_rate
    end = len(codes) if args.length < 0 else args.start + args.length
    try:
        samples = tokenizer.decode(np.asarray(codes[args.start:end]))
    except ValueError as e:  # an id past 255: not mu-law codes
        sys.exit(f"{args.shard}: {e}")
    audio.write_wav(args.output, samples, rate)
    print(f"wrote {len(samples):,} samples ({len(samples) / rate:.2f} s at {rate} Hz) to {args.output}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "decode":
        return decode_main(argv[1:])
    return encode_main(argv)


if __name__ == "__main__":
    main()
