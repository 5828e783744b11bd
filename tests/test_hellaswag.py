"""HellaSwag: reading, rendering, and the batched, distributed-aware evaluation."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyllmc.hellaswag import check_tokenizer, ending_losses, evaluate, iterate_examples, render_example
from pyllmc.tokenizer import VOCAB_SIZE, GPT2Tokenizer, TokenIds, TrimmedGPT2Tokenizer, decode, encode, get_encoding

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PADDED_VOCAB = 50304


@pytest.fixture(scope="module")
def hellaswag_path():
    path = DATA / "hellaswag_val_preprocessed.jsonl"
    if not path.exists():
        pytest.skip(f"reference data {path.name} not found in {DATA} (the offline data folder beside the repo)")
    return path


def first_examples(path, n):
    examples = []
    for example in iterate_examples(path):
        examples.append(example)
        if len(examples) == n:
            return examples


class TinyCausalLM(nn.Module):
    """Embedding, a causal running mean over positions, a head onto the padded vocabulary whose
    padded columns hold large logits (they must never be scored)."""

    def __init__(self, dim=16, vocab_size=VOCAB_SIZE, padded_vocab_size=PADDED_VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, padded_vocab_size)
        with torch.no_grad():
            self.head.bias[vocab_size:] = 50.0

    def forward(self, idx):  # (B, T) -> (B, T, Vp), None
        h = self.embed(idx).cumsum(dim=1)
        h = h / torch.arange(1, idx.shape[1] + 1, device=idx.device).view(1, -1, 1)
        return self.head(h), None


class OracleLM(nn.Module):
    """Knows the right answers: after any prefix of a correct context+ending it puts almost all
    probability on the correct next token; elsewhere it is uniform."""

    def __init__(self, examples):
        super().__init__()
        self.next_token = {}
        for example in examples:
            tokens, mask, label = render_example(example)
            row = tokens[label, : int(mask[label].nonzero().max()) + 1].tolist()
            for t in range(len(row) - 1):
                self.next_token[tuple(row[: t + 1])] = row[t + 1]

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, VOCAB_SIZE)
        for r, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next_token.get(tuple(row[: t + 1]))
                if nxt is not None:
                    logits[r, t, nxt] = 30.0
        return logits, None


def test_iterate_examples_reads_the_whole_file(hellaswag_path):
    examples = list(iterate_examples(hellaswag_path))
    assert len(examples) == 10042
    assert Counter(e["label"] for e in examples) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
    assert examples[0]["ctx"] == "A man is sitting on a roof. he" and examples[0]["label"] == 3
    assert all(len(e["endings"]) == 4 for e in examples)


def test_iterate_examples_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "endings": ["b"]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iterate_examples(path))


def test_render_example(hellaswag_path):
    for example in first_examples(hellaswag_path, 5):
        tokens, mask, label = render_example(example, get_encoding())
        ctx = encode(example["ctx"])
        assert tokens.dtype == torch.int64 and mask.shape == tokens.shape and tokens.shape[0] == 4
        assert label == example["label"]
        lengths = []
        for i, ending in enumerate(example["endings"]):
            end = encode(" " + ending)
            n = len(ctx) + len(end)
            lengths.append(n)
            assert tokens[i, : len(ctx)].tolist() == ctx
            assert tokens[i, len(ctx) : n].tolist() == end
            assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (tokens.shape[1] - n)
            assert not tokens[i, n:].any()  # right padding
            assert decode(tokens[i, :n]) == example["ctx"] + " " + ending
        assert tokens.shape[1] == max(lengths)


def reference_predictions(model, examples):
    """Each ending scored alone (no batching, no padding): (preds by sum, preds by mean, sums)."""
    preds, preds_norm, sums = [], [], []
    for example in examples:
        ctx = encode(example["ctx"])
        scores = []
        for ending in example["endings"]:
            row = torch.tensor([ctx + encode(" " + ending)])
            logits, _ = model(row)
            losses = F.cross_entropy(logits[0, :-1, :VOCAB_SIZE].double(), row[0, 1:], reduction="none")
            ending_part = losses[len(ctx) - 1 :]
            scores.append((ending_part.sum().item(), ending_part.mean().item()))
        sums.append([s for s, _ in scores])
        preds.append(min(range(4), key=lambda i: scores[i][0]))
        preds_norm.append(min(range(4), key=lambda i: scores[i][1]))
    return preds, preds_norm, sums


@torch.no_grad()
def test_evaluate_matches_unbatched_reference(hellaswag_path):
    model = TinyCausalLM()
    examples = first_examples(hellaswag_path, 8)
    preds, preds_norm, sums = reference_predictions(model, examples)
    labels = [e["label"] for e in examples]
    expected_acc = sum(p == l for p, l in zip(preds, labels)) / 8
    expected_acc_norm = sum(p == l for p, l in zip(preds_norm, labels)) / 8

    model.train()
    for batch_size in (1, 3):
        result = evaluate(model, hellaswag_path, device="cpu", max_examples=8, batch_size=batch_size, progress=False)
        assert result["n"] == 8
        assert 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0
        assert result["acc"] == expected_acc and result["acc_norm"] == expected_acc_norm
    assert model.training  # restored

    # the per-ending sums of a padded batch equal the unpadded ones
    rendered = [render_example(e) for e in examples[:2]]
    length = max(t.shape[1] for t, _, _ in rendered) + 5
    tokens = torch.zeros(8, length, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, (t, m, _) in enumerate(rendered):
        tokens[4 * i : 4 * i + 4, : t.shape[1]] = t
        mask[4 * i : 4 * i + 4, : m.shape[1]] = m
    summed, mean = ending_losses(model, tokens, mask)
    expected = torch.tensor(sums[0] + sums[1], dtype=torch.float64)
    torch.testing.assert_close(summed.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean, summed / mask[:, 1:].sum(1))


def test_evaluate_with_an_oracle(hellaswag_path):
    examples = first_examples(hellaswag_path, 8)
    result = evaluate(OracleLM(examples), hellaswag_path, device="cpu", max_examples=8, batch_size=4, progress=False)
    assert result == {"n": 8, "acc": 1.0, "acc_norm": 1.0}


def test_evaluate_split_across_ranks(hellaswag_path):
    examples = first_examples(hellaswag_path, 8)
    oracle = OracleLM(examples[1::2])  # right about the odd-numbered examples only
    full = evaluate(oracle, hellaswag_path, device="cpu", max_examples=8, progress=False)
    assert full["n"] == 8 and full["acc"] >= 0.5
    parts = [evaluate(oracle, hellaswag_path, device="cpu", max_examples=8, rank=r, world_size=2, progress=False)
             for r in range(2)]
    assert [p["n"] for p in parts] == [4, 4]
    assert parts[1]["acc"] == 1.0  # rank 1 took exactly the odd examples
    for key in ("acc", "acc_norm"):
        assert (parts[0][key] + parts[1][key]) * 4 == full[key] * 8


def test_evaluate_all_reduces_under_torch_distributed(hellaswag_path, tmp_path):
    import torch.distributed as dist

    examples = first_examples(hellaswag_path, 4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        result = evaluate(OracleLM(examples), hellaswag_path, device="cpu", max_examples=4, progress=False)
    finally:
        dist.destroy_process_group()
    assert result == {"n": 4, "acc": 1.0, "acc_norm": 1.0}


def test_evaluate_pad_to(hellaswag_path):
    model = TinyCausalLM()
    a = evaluate(model, hellaswag_path, device="cpu", max_examples=4, batch_size=2, progress=False)
    b = evaluate(model, hellaswag_path, device="cpu", max_examples=4, batch_size=2, pad_to=128, progress=False)
    assert a == b
    with pytest.raises(ValueError, match="pad_to=8"):
        evaluate(model, hellaswag_path, device="cpu", max_examples=4, pad_to=8, progress=False)


def test_hellaswag_script_converts_both_formats(tmp_path, hellaswag_path):
    # the six-lines-per-example text form gives back exactly the preprocessed file we test with
    source = DATA / "hellaswag_val_full.txt.bz2"
    if not source.exists():
        pytest.skip(f"{source.name} not found in {DATA}")
    out = tmp_path / "from_text.jsonl"
    result = subprocess.run([sys.executable, str(REPO / "dev" / "data" / "hellaswag.py"), "--input", str(source),
                             "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == hellaswag_path.read_bytes()

    # the official jsonl form (fields as in rowanz/hellaswag's hellaswag_val.jsonl)
    official = tmp_path / "official.jsonl"
    rows = [{"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
             "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
             "label": 3, "endings": ["a.", "b.", "c.", "d."], "source_id": "activitynet~v_-JhWjGDPHMY"}]
    official.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "from_official.jsonl"
    result = subprocess.run([sys.executable, str(REPO / "dev" / "data" / "hellaswag.py"), "--input", str(official),
                             "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (example,) = list(iterate_examples(out))
    assert example == {"idx": 24, "activity_label": "Roof shingle removal", "ctx": rows[0]["ctx"],
                       "endings": rows[0]["endings"], "label": 3}


@torch.no_grad()
def test_evaluate_through_a_trimmed_tokenizer(hellaswag_path):
    """A model trained on GPT-2 trimmed to a corpus's commonest tokens (the CPU demo's tokenizer, here 512 ids
    padded to 640) is scored through that tokenizer: GPT-2's ids would be past its embedding."""
    examples = first_examples(hellaswag_path, 6)
    text = " ".join(e["ctx"] + " " + " ".join(e["endings"]) for e in examples)
    trimmed = TrimmedGPT2Tokenizer.fit(encode(text), 512)
    model = TinyCausalLM(vocab_size=512, padded_vocab_size=640)
    # the reference: each ending alone, encoded with the trimmed tokenizer, scored over the 512 real ids
    preds, preds_norm = [], []
    for example in examples:
        ctx = trimmed.encode(example["ctx"])
        scores = []
        for ending in example["endings"]:
            row = torch.tensor([ctx + trimmed.encode(" " + ending)])
            assert row.max() < 512
            logits, _ = model(row)
            losses = F.cross_entropy(logits[0, :-1, :512].double(), row[0, 1:], reduction="none")[len(ctx) - 1:]
            scores.append((losses.sum().item(), losses.mean().item()))
        preds.append(min(range(4), key=lambda i: scores[i][0]))
        preds_norm.append(min(range(4), key=lambda i: scores[i][1]))
    labels = [e["label"] for e in examples]
    result = evaluate(model, hellaswag_path, device="cpu", max_examples=6, batch_size=4, progress=False,
                      tokenizer=trimmed)
    assert result == {"n": 6, "acc": sum(p == l for p, l in zip(preds, labels)) / 6,
                      "acc_norm": sum(p == l for p, l in zip(preds_norm, labels)) / 6}
    tokens, mask, _ = render_example(examples[0], trimmed)  # lossless: the ids spell the text back
    n = int(mask[0].nonzero().max()) + 1
    assert trimmed.decode(tokens[0, :n].tolist()) == examples[0]["ctx"] + " " + examples[0]["endings"][0]


def test_a_tokenizer_that_cannot_serve_hellaswag_is_refused():
    from pyllmc.audio import MuLawTokenizer

    check_tokenizer(GPT2Tokenizer(), VOCAB_SIZE)  # text tokenizers that encode pass
    check_tokenizer(TrimmedGPT2Tokenizer.fit(encode("a few words of text"), 300), 300)
    for tokenizer in (MuLawTokenizer(8000), TokenIds()):
        with pytest.raises(ValueError, match=r"HellaSwag is English text, and this run's tokenizer .* does not encode "
                                             r"text: .*--hellaswag 0"):
            check_tokenizer(tokenizer)
    with pytest.raises(ValueError, match=r"tokenizer gpt2 \(50,257 ids\) has ids past the model's 300"):
        check_tokenizer(GPT2Tokenizer(), 300)


def test_examples_longer_than_the_context_lose_the_start_of_their_context(hellaswag_path):
    """A model with block_size shorter than an example (a small Llama's) sees the example's last
    block_size tokens, never more positions than it has; the endings stay whole, so a model whose
    prediction depends only on the current token scores exactly as without the limit. An ending that
    cannot fit with one context token before it is refused."""
    from types import SimpleNamespace

    class Bigram(nn.Module):
        def __init__(self, block_size=None):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(VOCAB_SIZE, 8)
            self.head = nn.Linear(8, VOCAB_SIZE)
            if block_size is not None:
                self.config = SimpleNamespace(block_size=block_size)

        def forward(self, idx):  # (B, T) -> (B, T, V), None: position t sees token t only
            if hasattr(self, "config"):
                assert idx.shape[1] <= self.config.block_size, idx.shape
            return self.head(self.embed(idx)), None

    examples = first_examples(hellaswag_path, 8)
    longest = max(render_example(e)[0].shape[1] for e in examples)
    shortest_context = min(int((render_example(e)[1][0] == 0).sum()) for e in examples)
    block = longest - shortest_context // 2
    assert block < longest  # some examples are cropped
    unlimited = evaluate(Bigram(), hellaswag_path, device="cpu", max_examples=8, progress=False)
    limited = evaluate(Bigram(block), hellaswag_path, device="cpu", max_examples=8, progress=False)
    assert limited == unlimited and limited["n"] == 8
    with pytest.raises(ValueError, match="does not fit the model's context"):
        evaluate(Bigram(4), hellaswag_path, device="cpu", max_examples=8, progress=False)
