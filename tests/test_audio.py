"""Audio as tokens: mu-law (pyllmc.audio), dev/data/audio.py's shards, and a GPT trained on them.

The audio is made here with numpy (chords, chirps; mono and stereo; 16 and 22.05 kHz), so nothing
is downloaded: WAV -> tokens -> WAV stays within mu-law's quantization error; the data script
writes shards with a val split and a manifest declaring the mu-law tokenizer; train_gpt2.py learns
a periodic signal (loss well below log(256) = 5.55) and writes its samples as WAV files of the
requested length, recording where in its log.
"""

import json
import math
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from pyllmc import audio
from pyllmc.data import declared_tokenizer, read_shard, shard_info
from pyllmc.tokenizer import from_spec

REPO = Path(__file__).resolve().parents[1]
RATE = audio.SAMPLE_RATE


def chord(seconds, rate=RATE, freqs=(250.0, 500.0, 750.0), amplitude=0.6):
    """A chord of sines, float in [-amplitude, amplitude]; 250/500/750 Hz repeat every 64 samples at 16 kHz."""
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * sum(np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs)) / len(freqs)


def chirp(seconds, rate=RATE, f0=100.0, f1=4000.0, amplitude=0.9):
    """A linear sweep from f0 to f1 Hz, with quiet and loud parts (mu-law's dense and sparse levels)."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.linspace(0.001, 1.0, t.size) ** 2
    return amplitude * envelope * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))


def to_int16(x):
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


# ---------------------------------------------------------------------------------------
# mu-law and WAV


def test_mulaw_round_trip_is_within_its_quantization_error():
    x = np.concatenate([chord(0.5), chirp(1.0), [-1.0, -0.5, 0.0, 1e-5, 0.5, 1.0]])
    codes = audio.mulaw_encode(x)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 255  # 256 levels, all in use at +-1
    y = audio.mulaw_decode(codes)
    bound = audio.mulaw_error_bound(x)
    assert np.all(np.abs(y - x) <= bound + 1e-6)  # + float32's rounding of the decoded value
    # the bound is mu-law's: tight near silence, about 1/32 of full scale at the loudest
    assert bound[np.abs(x) < 1e-3].max() < 2e-4 and 0.02 < bound.max() < 0.04
    assert np.abs(y - x).max() > 0.5 * bound.max()  # and the error does reach it
    assert audio.mulaw_encode(0.0) == audio.SILENCE and abs(audio.mulaw_decode(audio.SILENCE)) < 1e-2
    np.testing.assert_array_equal(audio.mulaw_encode(audio.mulaw_decode(np.arange(256))), np.arange(256))
    np.testing.assert_array_equal(audio.mulaw_encode([-3.0, 3.0]), [0, 255])  # clipped


def test_wav_to_tokens_to_wav(tmp_path):
    x = np.concatenate([chord(0.5), chirp(0.5)])
    wavfile.write(tmp_path / "in.wav", RATE, to_int16(x))
    read = audio.read_wav(tmp_path / "in.wav")
    assert read.dtype == np.float32 and read.shape == x.shape
    tok = audio.MuLawTokenizer()
    ids = tok.encode(read)
    assert min(ids) >= 0 and max(ids) < tok.vocab_size == 256
    written = tok.write_sample(ids, tmp_path / "out.wav")
    with wave.open(str(written)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, RATE, x.size)
    back = audio.read_wav(written)
    # mu-law's error, plus the two 16-bit roundings (input file, output file)
    assert np.all(np.abs(back - x) <= audio.mulaw_error_bound(read) + 2 / 32767 + 1e-6)
    assert not list(tmp_path.glob(".*"))  # no temporary left


def test_read_wav_mixes_down_and_resamples(tmp_path):
    rate = 22050
    t = np.arange(rate) / rate  # one second
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 1000 * t)
    wavfile.write(tmp_path / "stereo.wav", rate, to_int16(np.stack([left, right], axis=1)))
    x = audio.read_wav(tmp_path / "stereo.wav")
    assert x.shape == (RATE,)  # 1 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(x))  # 1 Hz bins: both channels' tones, at their own frequency, half each
    assert sorted(np.argsort(spectrum)[-2:].tolist()) == [440, 1000]
    assert spectrum[440] == pytest.approx(spectrum[1000], rel=0.05)
    assert np.abs(x).max() == pytest.approx(0.5, abs=0.03)
    # the other sample formats scipy reads come to the same floats
    mono = 0.5 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)
    for name, data in [("u8", np.round(mono * 127 + 128).astype(np.uint8)), ("i16", to_int16(mono)),
                       ("i32", np.round(mono * 2**31).astype(np.int32)), ("f32", mono.astype(np.float32))]:
        wavfile.write(tmp_path / f"{name}.wav", RATE, data)
        np.testing.assert_allclose(audio.read_wav(tmp_path / f"{name}.wav"), mono, atol=1 / 100)


def test_a_file_that_is_not_a_wav_is_named(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(ValueError, match=r"notes\.wav: not a readable WAV file"):
        audio.read_wav(tmp_path / "notes.wav")
    with pytest.raises(ValueError, match="sample_rate must be a positive int"):
        audio.MuLawTokenizer(0)


# ---------------------------------------------------------------------------------------
# dev/data/audio.py


def make_wavs(folder: Path):
    """Two files in a folder tree: a 16 kHz mono chord (2 s) and a 22.05 kHz stereo chirp (1.5 s)."""
    (folder / "b").mkdir(parents=True)
    wavfile.write(folder / "a_chord.wav", RATE, to_int16(chord(2.0)))
    c = chirp(1.5, rate=22050)
    wavfile.write(folder / "b" / "chirp.wav", 22050, to_int16(np.stack([c, 0.5 * c], axis=1)))
    return [folder / "a_chord.wav", folder / "b" / "chirp.wav"]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_audio_script_writes_shards_with_a_val_split_and_a_manifest(tmp_path, dtype, capsys):
    files = make_wavs(tmp_path / "wavs")
    out = tmp_path / "shards"
    audio.main(["--input", str(tmp_path / "wavs"), "--output_dir", str(out), "--shard_size", "20000",
                "--dtype", dtype])
    names = sorted(p.name for p in out.glob("*.bin"))
    assert names == ["audio_train_000001.bin", "audio_train_000002.bin", "audio_train_000003.bin",
                     "audio_val_000000.bin"]
    assert all(shard_info(out / n)[1] == np.dtype(dtype) for n in names)
    manifest = json.loads((out / "audio_manifest.json").read_text())
    assert manifest["tokenizer"] == {"name": "mulaw", "sample_rate": RATE}
    assert [r["file"] for r in manifest["config"]["files"]] == [str(f) for f in files]  # sorted, recursive
    assert [r["samples"] for r in manifest["config"]["files"]] == [32000, 24000]  # the chirp resampled to 16 kHz
    spec, _ = declared_tokenizer([out / n for n in names])
    assert from_spec(spec) == audio.MuLawTokenizer(RATE)
    # each file's last 10% is val; the rest, files in order, is train
    codes = [audio.mulaw_encode(audio.read_wav(f)) for f in files]
    val = read_shard(out / "audio_val_000000.bin")
    train = np.concatenate([read_shard(out / n) for n in names[:3]])
    np.testing.assert_array_equal(val, np.concatenate([codes[0][-3200:], codes[1][-2400:]]))
    np.testing.assert_array_equal(train, np.concatenate([codes[0][:-3200], codes[1][:-2400]]))
    assert {e["file"]: e["max_token_id"] for e in manifest["shards"]} == \
        {n: int(read_shard(out / n).max()) for n in names}  # the loader takes them instead of a scan
    assert "--vocab_size 256" in capsys.readouterr().out  # it says how to train on them

    # decode: back to a WAV at the manifest's rate
    audio.main(["decode", str(out / "audio_val_000000.bin"), "--output", str(tmp_path / "val.wav"),
                "--start", "100", "--length", "1000"])
    rate, data = wavfile.read(tmp_path / "val.wav")
    assert rate == RATE and data.shape == (1000,) and data.dtype == np.int16
    np.testing.assert_allclose(data / 32767, audio.mulaw_decode(val[100:1100]), atol=1 / 32767)


def test_audio_script_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .wav files in folder"):
        audio.main(["--input", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="does not exist"):
        audio.main(["--input", str(tmp_path / "nope.wav"), "--output_dir", str(tmp_path / "o")])
    (tmp_path / "bad.wav").write_text("text")
    with pytest.raises(SystemExit, match=r"bad\.wav: not a readable WAV file"):
        audio.main(["--input", str(tmp_path / "bad.wav"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        audio.write_shards([tmp_path / "bad.wav"], tmp_path / "o", val_fraction=1.0)
    from pyllmc.data import write_shard

    write_shard(tmp_path / "text.bin", [300, 5])  # not mu-law codes
    with pytest.raises(SystemExit, match="token id 300 at position 0"):
        audio.main(["decode", str(tmp_path / "text.bin"), "--output", str(tmp_path / "x.wav")])


def test_audio_script_writes_into_the_user_cache_by_default(tmp_path):
    """python dev/data/audio.py --input WAVS, as a user runs it: the shards go to
    <cache>/data/audio-<first file>-<hash>/, nothing into the source tree or the working folder."""
    make_wavs(tmp_path / "wavs")
    cache = tmp_path / "cache"

    def source_tree():
        return sorted(p.relative_to(REPO) for p in (REPO / "dev" / "data").rglob("*")
                      if "__pycache__" not in p.parts)

    before = source_tree()
    result = subprocess.run([sys.executable, str(REPO / "dev" / "data" / "audio.py"), "--input",
                             str(tmp_path / "wavs")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYLLMC_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    (out,) = (cache / "data").iterdir()
    assert out.name.startswith("audio-a_chord-") and len(out.name) == len("audio-a_chord-") + 12
    assert sorted(p.name for p in out.iterdir()) == ["audio_manifest.json", "audio_train_000001.bin",
                                                     "audio_val_000000.bin"]
    assert f"--input_bin '{out}/audio_train_*.bin'" in result.stdout
    assert source_tree() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "wavs"]


# ---------------------------------------------------------------------------------------
# train_gpt2.py on audio


@pytest.mark.slow  # a subprocess that trains 20 steps and samples twice: ~15 s on 2 idle cores
def test_a_gpt_learns_a_periodic_signal_and_writes_wav_samples(tmp_path):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    wavfile.write(wavs / "chord.wav", RATE, to_int16(chord(3.0)))  # period 64 samples
    shards = tmp_path / "shards"
    audio.write_shards([wavs], shards)
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "train_gpt2.py"), "--input_bin", str(shards / "audio_train_*.bin"),
               "--input_val_bin", str(shards / "audio_val_*.bin"), "--vocab_size", "256", "--model", "tiny",
               "--batch_size", "4", "--sequence_length", "128", "--num_iterations", "20", "--learning_rate", "3e-3",
               "--warmup_iters", "3", "--val_max_steps", "2", "--sample_every", "10", "--sample_length", "300",
               "--backend", "torch", "--device", "cpu", "--output_dir", str(out), "--checkpoint_every", "-1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "block 256, vocab 256\n" in result.stdout  # 256 is a multiple of 128: no padding
    assert "tokenizer mulaw-16000hz (256 8-bit mu-law codes of 16,000 Hz mono audio)" in result.stdout
    records = [json.loads(line) for line in (out / "main.jsonl").read_text().splitlines()]
    config = records[0]
    assert config["tokenizer"] == {"name": "mulaw", "sample_rate": RATE}
    assert config["model_config"]["vocab_size"] == 256 and config["model_config"]["padded_vocab_size"] == 256
    losses = [r["loss"] for r in records if r["type"] == "train"]
    final_val = [r["val_loss"] for r in records if r["type"] == "val"][-1]
    print(f"audio: first loss {losses[0]:.3f}, last {losses[-1]:.3f}, final val {final_val:.3f}")
    assert losses[0] > 5.0 and final_val < 0.5 * math.log(256), (losses, final_val)
    samples = [r for r in records if r["type"] == "sample"]
    assert [r["step"] for r in samples] == [10, 20]
    for r in samples:
        path = Path(r["path"])
        assert path == out / f"sample_{r['step']:08d}.wav" and r["tokens"] == 300
        assert f"300 tokens written to {path}" in result.stdout
        with wave.open(str(path)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, RATE, 300)
    assert "---- sample" not in result.stdout  # audio is not printed as text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "shards", "wavs"]
