"""HellaSwag validation set in the JSON-lines form pyllmc.hellaswag reads.

Each output line is {"idx", "activity_label", "ctx", "endings": [4 strings], "label": 0..3}.
pyllmc.hellaswag.evaluate scores "ctx" followed by " " + each ending (completion style, as
llm.c and build-nanogpt do); idx and activity_label are informational.

Inputs (the format is recognised from the content):
  * nothing: download the official validation file (10,042 examples, 12 MB) from the
    HellaSwag repository (rowanz/hellaswag, MIT); its rows already hold ctx/endings/label,
    and "ind" becomes idx;
  * --input FILE.jsonl: a local copy of the official file, or any jsonl with ctx/endings/label;
  * --input FILE.txt or FILE.txt.bz2: the six-lines-per-example text form used by some
    offline mirrors ("activity_label: ctx", label, then the four endings); idx is then the
    0-based position.

By default the output goes to pyllmc's user cache, never the source tree, where train_gpt2.py
--hellaswag 1 looks for it (pyllmc.corpus.hellaswag_path(): $PYLLMC_CACHE_DIR, else
$XDG_CACHE_HOME/pyllmc, else ~/.cache/pyllmc, then data/hellaswag/hellaswag_val.jsonl). Without
--input, an output file that is already there and reads as HellaSwag is kept: nothing is downloaded.

    python dev/data/hellaswag.py                       # -> <cache>/data/hellaswag/hellaswag_val.jsonl
    python dev/data/hellaswag.py --input hellaswag_val.jsonl --output out.jsonl
"""

import argparse
import bz2
import json
import sys
import urllib.request
from pathlib import Path

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_ENDINGS = 4


def from_jsonl(lines):
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = json.loads(line)
        yield {
            "idx": row.get("idx", row.get("ind", i)),
            "activity_label": row.get("activity_label", ""),
            "ctx": row["ctx"],
            "endings": list(row["endings"]),
            "label": int(row["label"]),
        }


def from_six_line_text(lines):
    lines = [line.rstrip("\n") for line in lines]
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"the text form has 6 lines per example, but the file has {len(lines)} lines")
    for idx in range(len(lines) // 6):
        head, label, *endings = lines[6 * idx : 6 * idx + 6]
        activity_label, sep, ctx = head.partition(": ")
        if not sep:
            raise ValueError(f"example {idx}: first line {head!r} is not 'activity_label: ctx'")
        yield {"idx": idx, "activity_label": activity_label, "ctx": ctx, "endings": endings, "label": int(label)}


def read_lines(path: Path) -> list[str]:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.readlines()


def convert(lines) -> list[dict]:
    first = next((line for line in lines if line.strip()), "")
    rows = list(from_jsonl(lines) if first.lstrip().startswith("{") else from_six_line_text(lines))
    for row in rows:
        if len(row["endings"]) != NUM_ENDINGS or not 0 <= row["label"] < NUM_ENDINGS:
            raise ValueError(f"example {row['idx']}: expected {NUM_ENDINGS} endings and a label in 0..3")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="local HellaSwag file (default: download the official one)")
    parser.add_argument("--output", type=Path, default=None,
                        help="output jsonl (default: pyllmc's user cache, <cache>/data/hellaswag/hellaswag_val.jsonl)")
    args = parser.parse_args(argv)
    if args.output is None:
        from pyllmc.corpus import hellaswag_path  # here: importing pyllmc (torch) takes seconds

        args.output = hellaswag_path()

    if args.input is None and args.output.is_file():  # downloaded before: keep it unless it is broken
        try:
            rows = convert(read_lines(args.output))
        except (ValueError, KeyError, OSError, UnicodeDecodeError):
            rows = []
        if rows:
            print(f"{args.output} already holds {len(rows):,} examples (delete it to download again)")
            return
    if args.input is not None:
        lines = read_lines(args.input)
    else:
        print(f"downloading {URL}")
        with urllib.request.urlopen(URL, timeout=120) as response:
            lines = response.read().decode("utf-8").splitlines(keepends=True)
    try:
        rows = convert(lines)
    except (ValueError, KeyError) as e:
        sys.exit(f"cannot convert {args.input or URL}: {e}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(args.output)
    print(f"wrote {len(rows):,} examples to {args.output}")


if __name__ == "__main__":
    main()
