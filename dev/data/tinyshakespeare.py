"""Tiny Shakespeare as llm.c token shards (GPT-2 tokens).

Downloads Karpathy's char-rnn `input.txt` (1.1 MB, 40,000 lines of Shakespeare) or reads a
local copy (--input), and writes two llm.c shards into --output_dir:
    tiny_shakespeare_val.bin     the first 32,768 tokens
    tiny_shakespeare_train.bin   the rest (about 305k tokens)
    tiny_shakespeare_manifest.json   each shard's token count and sha256, which the training
                                     loader checks once per run (pyllmc.data)

The tokens follow llm.c's own tinyshakespeare script, so the shards are interchangeable with
its: the text is cut at every blank line ("\\n\\n") into sections; each section is one
document, written as EOT followed by its tokens, and every section but the last keeps a
trailing "\\n\\n" (llm.c keeps the separator this way for backward compatibility).

    python dev/data/tinyshakespeare.py
    python dev/data/tinyshakespeare.py --input input.txt --output_dir data/shakespeare
"""

import argparse
import json
import sys
import urllib.request
from pathlib import Path

from pyllmc.data import MANIFEST_SUFFIX, write_shard
from pyllmc.tokenizer import EOT_TOKEN, encode

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_TOKENS = 32768


def tokenize(text: str) -> list[int]:
    sections = text.split("\n\n")
    tokens = []
    for i, section in enumerate(sections):
        tokens.append(EOT_TOKEN)
        tokens.extend(encode(section + "\n\n" if i < len(sections) - 1 else section))
    return tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="local tinyshakespeare text file (default: download it)")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).parent / "tinyshakespeare",
                        help="where the shards go (default: dev/data/tinyshakespeare/)")
    args = parser.parse_args(argv)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.input is not None:
        text = args.input.read_text(encoding="utf-8")
    else:
        cached = args.output_dir / "tiny_shakespeare.txt"
        if not cached.exists():
            print(f"downloading {URL}")
            with urllib.request.urlopen(URL, timeout=60) as response:
                cached.write_bytes(response.read())
        text = cached.read_text(encoding="utf-8")

    tokens = tokenize(text)
    if len(tokens) <= VAL_TOKENS:
        sys.exit(f"the text has only {len(tokens)} tokens; the validation split alone takes {VAL_TOKENS}")
    manifest_path = args.output_dir / f"tiny_shakespeare{MANIFEST_SUFFIX}"
    manifest_path.unlink(missing_ok=True)  # no stale checksums beside new shards, even after a crash
    shards = []
    for split, part in (("val", tokens[:VAL_TOKENS]), ("train", tokens[VAL_TOKENS:])):
        path = args.output_dir / f"tiny_shakespeare_{split}.bin"
        shards.append({"file": path.name, "tokens": len(part), "sha256": write_shard(path, part)})
        print(f"wrote {len(part):,} tokens to {path}")
    manifest = {"config": {"source": "tinyshakespeare", "tokenizer": "gpt2", "val_tokens": VAL_TOKENS},
                "complete": True, "shards": shards}
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)


if __name__ == "__main__":
    main()
