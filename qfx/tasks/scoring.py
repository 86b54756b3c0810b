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
                   progress: bool = True, desc: str = "tasks") -> list[tuple[float, bool]]:
    """(sum of log P(continuation tokens), whether greedy decoding gives exactly them) per request.

    model: input_ids (B, S) -> logits (B, S, V).
    """
    encoded = [encode(tokenizer, c, x) for c, x in requests]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    bar = tqdm(total=len(order), desc=desc, unit="request", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows, targets = [], []
            for i in chunk:
                ctx, cont = encoded[i]
                seq = (ctx + cont)[-(max_length + 1):]
                rows.append(seq[:-1])
                targets.append(cont[-(len(seq) - 1):])  # all of it unless the window cut into it
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
            logits = model(ids.to(device))
            for j, i in enumerate(chunk):
                n, t = len(rows[j]), torch.tensor(targets[j], device=logits.device)
                logp = torch.log_softmax(logits[j, n - len(t): n].float(), dim=-1)
                results[i] = (float(logp.gather(-1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all()))
            bar.update(len(chunk))
    bar.close()
    return results
