"""HellaSwag evaluation, completion style (as in llm.c and build-nanogpt).

Each example is a context and four candidate endings. We feed the model the context followed
by " " + ending, one row per ending, and score each ending by the cross-entropy of its tokens
given everything before them:
    acc       picks the ending with the lowest total (summed) loss,
    acc_norm  picks the ending with the lowest mean loss per token (length-normalised).
GPT-2 124M reaches about 0.29-0.30 acc_norm this way; a random guesser 0.25.

The input is JSON lines with at least {"ctx": str, "endings": [4 str], "label": int}: the
official `hellaswag_val.jsonl` has these fields, and so does the file dev/data/hellaswag.py
writes.

The text is encoded with the tokenizer the model was trained with (a pyllmc.tokenizer Tokenizer that
encodes text: GPT-2's by default, or GPT-2 trimmed to a corpus's commonest tokens, the CPU demo's,
which spells the tokens it lacks in bytes), and the losses run over the model's own token ids (the
rest of a padded vocabulary is never scored). check_tokenizer says, before a run trains, when a
tokenizer cannot serve (audio, raw ids).

    result = evaluate(model, "hellaswag_val.jsonl", device="cuda")   # {"n", "acc", "acc_norm"}
    result = evaluate(model, path, device="cpu", tokenizer=run_tokenizer, vocab_size=model.config.vocab_size)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .tokenizer import VOCAB_SIZE, Tokenizer, get_encoding

NUM_ENDINGS = 4


def iterate_examples(path):
    """Yield {"ctx", "endings", "label"} dicts (other fields kept) from a HellaSwag jsonl file."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                example["label"] = int(example["label"])
                ok = (isinstance(example["ctx"], str) and len(example["endings"]) == NUM_ENDINGS
                      and 0 <= example["label"] < NUM_ENDINGS)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_number}: not a HellaSwag example ({e})") from e
            if not ok:
                raise ValueError(f"{path}:{line_number}: a HellaSwag example needs a ctx string, "
                                 f"{NUM_ENDINGS} endings and a label in 0..{NUM_ENDINGS - 1}")
            yield example


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
    """ValueError saying why HellaSwag cannot be scored through `tokenizer` for a model of `vocab_size`
    ids: it does not encode text (audio, raw ids), or it has ids past the model's."""
    if tokenizer.modality != "text" or type(tokenizer).encode is Tokenizer.encode:
        raise ValueError(f"HellaSwag is English text, and this run's tokenizer {tokenizer.describe()} does not "
                         f"encode text: evaluate a text model, or turn it off (--hellaswag 0)")
    if vocab_size is not None and tokenizer.vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer {tokenizer.describe()} has ids past the model's {vocab_size:,}: HellaSwag's "
                         f"text could encode to ids the model cannot embed; turn it off (--hellaswag 0)")


def _encoder(enc):
    """text -> ids: a pyllmc Tokenizer's encode, or a tiktoken Encoding's encode_ordinary."""
    return enc.encode if isinstance(enc, Tokenizer) else enc.encode_ordinary


def render_example(example: dict, enc=None):
    """(tokens, mask, label): tokens (4, L) int64 rows of context + " " + ending, zero-padded
    on the right to the longest row; mask (4, L) int64 is 1 on the ending's tokens. enc: a
    pyllmc.tokenizer Tokenizer or a tiktoken Encoding (default: GPT-2's)."""
    encode = _encoder(enc if enc is not None else get_encoding())
    ctx_tokens = encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        # the space belongs to the ending: GPT-2's BPE merges it into the ending's first word
        end_tokens = encode(" " + ending)
        rows.append(ctx_tokens + end_tokens)
        masks.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
    length = max(len(r) for r in rows)
    tokens = torch.zeros((NUM_ENDINGS, length), dtype=torch.long)
    mask = torch.zeros((NUM_ENDINGS, length), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(m)] = torch.tensor(m)
    return tokens, mask, int(example["label"])


@torch.no_grad()
def ending_losses(model, tokens: torch.Tensor, mask: torch.Tensor,
                  vocab_size: int = VOCAB_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and mean of the per-token losses over each row's masked (ending) tokens, over the model's
    first vocab_size logits (the rest is padding).

    tokens, mask: (R, L) on the model's device; returns two (R,) float32 tensors."""
    logits, _ = model(tokens)  # (R, L, Vp) with Vp >= vocab_size (padded vocabularies allowed)
    logits = logits[:, :-1, :vocab_size].float()  # position t predicts token t+1
    targets = tokens[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), reduction="none")
    losses = losses.view(targets.shape)  # (R, L-1)
    target_mask = mask[:, 1:].to(losses.dtype)  # the loss of predicting each ending token
    summed = (losses * target_mask).sum(dim=1)
    return summed, summed / target_mask.sum(dim=1)


def _batches(examples, enc, batch_size: int, pad_to: int | None, max_length: int | None = None):
    """Group rendered examples into (tokens, mask, labels) batches of batch_size examples. An example
    longer than max_length (the model's context) loses the start of its context: the endings, which
    are scored, stay whole."""
    group = []
    for example in examples:
        tokens, mask, label = render_example(example, enc)
        if max_length is not None and tokens.shape[1] > max_length:
            cut = tokens.shape[1] - max_length
            # at least one context token must stay: it predicts the ending's first token
            if int(mask[:, : cut + 1].sum()):
                raise ValueError(f"a HellaSwag ending does not fit the model's context ({max_length} tokens)")
            tokens, mask = tokens[:, cut:], mask[:, cut:]
        group.append((tokens, mask, label))
        if len(group) == batch_size:
            yield _collate(group, pad_to)
            group = []
    if group:
        yield _collate(group, pad_to)


def _collate(group, pad_to):
    length = max(t.shape[1] for t, _, _ in group)
    if pad_to is not None:
        if length > pad_to:
            raise ValueError(f"a HellaSwag example has {length} tokens, more than pad_to={pad_to}")
        length = pad_to
    tokens = torch.zeros((len(group) * NUM_ENDINGS, length), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, (t, m, _) in enumerate(group):
        rows = slice(i * NUM_ENDINGS, (i + 1) * NUM_ENDINGS)
        tokens[rows, : t.shape[1]] = t
        mask[rows, : m.shape[1]] = m
    labels = torch.tensor([label for _, _, label in group])
    return tokens, mask, labels


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="hellaswag", unit="batch", leave=False)


def evaluate(model, path, *, device, max_examples=None, rank: int = 0, world_size: int = 1,
             batch_size: int = 8, pad_to: int | None = None, progress: bool = True,
             tokenizer: Tokenizer | None = None, vocab_size: int | None = None) -> dict:
    """HellaSwag accuracy of `model` (called as `logits, _ = model(tokens)`).

    Examples are dealt out round-robin (rank r takes examples i with i % world_size == r) and
    the counts summed over ranks with all_reduce when torch.distributed is initialised, so
    every rank returns the same result. batch_size examples (4 rows each) go through the model
    at once, right-padded to the longest (padding never influences the scored positions: the
    model is causal). pad_to fixes the padded length (e.g. the model's block size) so that a
    compiled model sees one shape. Pass the bare model, not a DDP wrapper. Run it under
    torch.autocast for bf16 evaluation. tokenizer: the one the model was trained with (default
    GPT-2's); vocab_size: the model's token ids (default the tokenizer's), past which logits are padding.

    Returns {"n": examples scored, "acc": ..., "acc_norm": ...}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if tokenizer is not None:
        check_tokenizer(tokenizer, vocab_size)
    enc = tokenizer if tokenizer is not None else get_encoding()
    if vocab_size is None:
        vocab_size = tokenizer.vocab_size if tokenizer is not None else VOCAB_SIZE
    examples = []
    for i, example in enumerate(iterate_examples(path)):
        if max_examples is not None and i >= max_examples:
            break
        if i % world_size == rank:
            examples.append(example)

    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.long)  # n, correct (sum), correct (mean)
    num_batches = -(-len(examples) // batch_size)
    try:
        # a model with a context limit (block_size: the positions it has) sees at most that many tokens
        max_length = getattr(getattr(model, "config", None), "block_size", None)
        batches = _batches(examples, enc, batch_size, pad_to, max_length)
        for tokens, mask, labels in _progress(batches, num_batches, progress and rank == 0):
            summed, mean = ending_losses(model, tokens.to(device), mask.to(device), vocab_size)
            pred = summed.view(-1, NUM_ENDINGS).argmin(dim=1).cpu()
            pred_norm = mean.view(-1, NUM_ENDINGS).argmin(dim=1).cpu()
            counts[0] += len(labels)
            counts[1] += (pred == labels).sum()
            counts[2] += (pred_norm == labels).sum()
    finally:
        model.train(was_training)

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.to(device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        counts = counts.cpu()
    n, correct, correct_norm = (int(c) for c in counts)
    return {"n": n, "acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1)}
