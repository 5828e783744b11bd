"""WAV files as llm.c token shards of 8-bit mu-law codes (256 tokens), and back.

"Swap text for audio": a GPT trained on these shards models sound one sample at a time, as
WaveNet does, with the same trainer (train_gpt2.py --vocab_size 256). The command line over
pyllmc.audio (its docstring, or --help, says everything); reading WAV files needs SciPy
(pip install "pyllmc[audio]"). Without --output_dir the shards go to pyllmc's user cache.

    python dev/data/audio.py --input FILES_OR_DIRS [--output_dir DIR] [--sample_rate 16000]
    python dev/data/audio.py decode DIR/audio_val_000000.bin --output val.wav
"""

from pyllmc.audio import main

if __name__ == "__main__":
    main()
