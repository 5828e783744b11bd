"""Tiny Shakespeare as llm.c token shards (GPT-2 tokens, or GPT-2 trimmed to its commonest tokens).

Downloads Karpathy's char-rnn `input.txt` (1.1 MB, 40,000 lines of Shakespeare) from its canonical
address (checked against its sha256) or reads a local copy (--input), and writes two llm.c shards:
    tiny_shakespeare_val.bin     the first 32,768 tokens
    tiny_shakespeare_train.bin   the rest (305,260 GPT-2 tokens)
    tiny_shakespeare_manifest.json   each shard's token count and sha256, which the training
                                     loader checks once per run, and the tokenizer (pyllmc.data)
By default they go into pyllmc's user cache (pyllmc.corpus: $PYLLMC_CACHE_DIR, else
$XDG_CACHE_HOME/pyllmc, else ~/.cache/pyllmc), where train_gpt2.py finds them; --output_dir puts
them in a folder of your choice instead.

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

import numpy as np

from pyllmc import corpus
from pyllmc.tokenizer import GPT2Tokenizer, TrimmedGPT2Tokenizer

VAL_TOKENS = corpus.VAL_TOKENS
tokenize = corpus.tokenize_sections  # the llm.c tokenization (kept under its old name)


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
        source = args.input if args.input is not None else corpus.download_tinyshakespeare()
        if args.output_dir is None:
            prepared = corpus.prepare_text(source, trim, shakespeare=True)
            for split, path in (("val", prepared.val), ("train", prepared.train)):
                print(f"{split}: {path}{'' if prepared.made_now else ' (already prepared)'}")
            return
        text = Path(source).read_text(encoding="utf-8")
    except (corpus.CorpusUnavailable, OSError) as e:
        sys.exit(f"{e}\n  Offline? Give a local copy with --input FILE.")

    tokens = tokenize(text)
    if len(tokens) <= VAL_TOKENS:
        sys.exit(f"the text has only {len(tokens)} tokens; the validation split alone takes {VAL_TOKENS}")
    val, train = tokens[:VAL_TOKENS], tokens[VAL_TOKENS:]
    tokenizer = GPT2Tokenizer()
    config = {"source": str(source), "text_sha256": corpus.sha256_text(text), "val_tokens": VAL_TOKENS}
    if trim is not None:
        tokenizer = TrimmedGPT2Tokenizer.fit(train, trim)
        val, train = tokenizer.from_gpt2(val), tokenizer.from_gpt2(train)
        config["trim_vocab"] = trim
    corpus.write_split(args.output_dir, "tiny_shakespeare", np.asarray(val), np.asarray(train), tokenizer, config)
    for split, part in (("val", val), ("train", train)):
        print(f"wrote {len(part):,} tokens to {args.output_dir / f'tiny_shakespeare_{split}.bin'}")


if __name__ == "__main__":
    main()
