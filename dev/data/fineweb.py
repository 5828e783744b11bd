"""FineWeb-Edu (or FineWeb, or local text files) as llm.c token shards of GPT-2 tokens.

The command line over pyllmc.fineweb (its docstring, or --help, says everything): without
--output_dir, FineWeb itself goes here, to dev/data/edu_fineweb10B (llm.c's place), local --input
files to pyllmc's user cache.

    python dev/data/fineweb.py                                  # FineWeb-Edu 10B, 100M-token shards
    python dev/data/fineweb.py --input docs.csv --output_dir data/docs     # prints the training flags
"""

from pathlib import Path

from pyllmc.fineweb import main

if __name__ == "__main__":
    main(download_dir=Path(__file__).resolve().parent)
