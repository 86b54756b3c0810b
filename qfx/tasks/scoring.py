"""Log-likelihood of continuations given contexts, batched, as lm-evaluation-harness scores them.

Tokenization follows the harness: whitespace at the end of a context moves to the front of
the continuation; the continuation's tokens are those of tok(context + continuation) after
tok(context)'s; an empty context is the end-of-text token. Sequences longer than the model's
window keep their last `max_length` + 1 tokens. Requests are run longest first, right-padded
(causal attention: padding after a sequence never changes its logits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm


def encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    whole = ids(context + continuation)
    ctx = ids(context) if context else []
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tokenizer.eos_token_id]
    return ctx, cont


def loglikelihoods(model: Callable[[torch.Tensor], torch.Tensor], tokenizer, requests: list[tuple[str, str]],
                   batch_size: int = 16, max_length: int = 2048, device: str | torch.device = "cpu",
                   progress: bool = True, desc: str = "tasks",
                   encoded: list[tuple[list[int], list[int]]] | None = None) -> list[tuple[float, bool]]:
    """(sum of log P(continuation tokens), whether greedy decoding gives exactly them) per request.

    model: input_ids (B, S) -> logits (B, S, V). encoded: `encode` of each request, when the
    caller already has it. Requests whose model input is the same token row (choices of one
    token after a shared context, as BoolQ's yes / no) share one row of the batch.
    """
    encoded = encoded if encoded is not None else [encode(tokenizer, c, x) for c, x in requests]
    row_of: dict[tuple[int, ...], int] = {}
    rows: list[tuple[int, ...]] = []
    wanted: list[tuple[int, list[int]]] = []  # per request: (its row, its target tokens)
    for ctx, cont in encoded:
        seq = (ctx + cont)[-(max_length + 1):]
        row = tuple(seq[:-1])
        if row not in row_of:
            row_of[row] = len(rows)
            rows.append(row)
        wanted.append((row_of[row], cont[-(len(seq) - 1):]))  # all of it unless the window cut into it
    readers: list[list[int]] = [[] for _ in rows]
    for i, (r, _) in enumerate(wanted):
        readers[r].append(i)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, unit="request", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(rows[r]) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            batch_row, position, target, owner, requests_here = [], [], [], [], []
            for j, r in enumerate(chunk):
                ids[j, : len(rows[r])] = torch.tensor(rows[r])
                for i in readers[r]:
                    t = wanted[i][1]
                    batch_row += [j] * len(t)
                    position += range(len(rows[r]) - len(t), len(rows[r]))
                    target += t
                    owner += [len(requests_here)] * len(t)
                    requests_here.append(i)
            logits = model(ids.to(device))
            index = {k: torch.tensor(v, device=logits.device) for k, v in
                     (("row", batch_row), ("pos", position), ("target", target), ("owner", owner))}
            logp = torch.log_softmax(logits[index["row"], index["pos"]].float(), dim=-1)  # (tokens, V)
            picked = logp.gather(-1, index["target"][:, None])[:, 0]
            missed = (logp.argmax(-1) != index["target"]).float()
            sums = torch.zeros(2, len(requests_here), device=logits.device)
            sums[0].index_add_(0, index["owner"], picked)
            sums[1].index_add_(0, index["owner"], missed)
            for i, (ll, miss) in zip(requests_here, sums.t().tolist()):
                results[i] = (ll, miss == 0)
            bar.update(len(requests_here))
    bar.close()
    return results
