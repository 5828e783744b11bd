"""Tiny Shakespeare as llm.c token shards (GPT-2 tokens, or GPT-2 trimmed to its commonest tokens).

Downloads Karpathy's char-rnn `input.txt` (1.1 MB, 40,000 lines of Shakespeare) from its canonical
address (checked against its sha256) or reads a local copy (--input), and writes two llm.c shards:
    tiny_shakespeare_val.bin     the first 32,768 tokens
    tiny_shakespeare_train.bin   the rest (305,260 GPT-2 tokens)
    tiny_shakespeare_manifest.json   each shard's token count, sha256 and largest id, which the
                                     training loader checks once per run, and the tokenizer (pyllmc.data)
By default they go into pyllmc's user cache (pyllmc.corpus: $PYLLMC_CACHE_DIR, else
$XDG_CACHE_HOME/pyllmc, else ~/.cache/pyllmc), where train_gpt2.py finds them; --output_dir puts
them in a folder of your choice instead (the code: pyllmc.corpus.prepare_text, write_tinyshakespeare).

The tokens follow llm.c's own tinyshakespeare script, so the shards are interchangeable with
its: the text is cut at every blank line ("\\n\\n") into sections; each section is one
document, written as EOT followed by its tokens, and every section but the last keeps a
trailing "\\n\\n" (llm.c keeps the separator this way for backward compatibility).
--trim_vocab N re-tokenizes them with GPT-2 trimmed to the train split's N commonest tokens
(pyllmc.tokenizer.TrimmedGPT2Tokenizer: what the CPU demo trains on).

    python dev/data/tinyshakespeare.py
    python dev/data/tinyshakespeare.py --input input.txt --output_dir data/shakespeare
"""

import argparse
import sys
from pathlib import Path

from pyllmc import corpus
from pyllmc.data import read_shard


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="local tinyshakespeare text file (default: download it)")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="where the shards go (default: pyllmc's cache, where train_gpt2.py looks)")
    parser.add_argument("--trim_vocab", type=int, default=0,
                        help="N > 0: GPT-2 trimmed to the train split's N commonest tokens (0: GPT-2's own)")
    args = parser.parse_args(argv)
    trim = args.trim_vocab if args.trim_vocab > 0 else None

    try:
        if args.output_dir is None:
            source = args.input if args.input is not None else corpus.download_tinyshakespeare()
            prepared = corpus.prepare_text(source, trim, shakespeare=True)
            for split, path in (("val", prepared.val), ("train", prepared.train)):
                print(f"{split}: {path}{'' if prepared.made_now else ' (already prepared)'}")
            return
        paths = corpus.write_tinyshakespeare(args.output_dir, args.input, trim)
    except corpus.CorpusUnavailable as e:
        sys.exit(f"{e}\n  Offline? Give a local copy with --input FILE.")
    train, val = paths
    for path in (val, train):
        print(f"wrote {len(read_shard(path)):,} tokens to {path}")


if __name__ == "__main__":
    main()
