"""TinyStories as llm.c token shards of a sentencepiece BPE vocabulary trained on it (llama2.c's recipe).

The command line over pyllmc.tinystories (its docstring, or --help, says everything): downloads
TinyStories_all_data.tar.gz (or reads --input: that archive, its .json files, or a .txt of stories),
trains a vocabulary of --vocab_size ids (default 4096) or uses --tokenizer, and writes uint16 shards
(shard 0 = val), a manifest that declares the tokenizer, tok<N>.model and llama2.c's tok<N>.bin into
pyllmc's user cache (or --output_dir).

    python dev/data/tinystories.py
    python dev/data/tinystories.py --vocab_size 512
    python dev/data/tinystories.py --input stories.txt --vocab_size 1024 --output_dir data/stories
"""

from pyllmc.tinystories import main

if __name__ == "__main__":
    main()
