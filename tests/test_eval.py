import math

import pytest
import torch
import torch.nn.functional as F

from qfx.eval import perplexity


class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


def test_uniform_model_has_perplexity_vocab_size():
    windows = torch.randint(0, 50, (3, 9))
    assert perplexity(Uniform(50), windows, batch_size=2, progress=False) == pytest.approx(50.0)


def test_matches_direct_cross_entropy(llama):
    windows = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))

    def logits(ids):
        return llama(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        lg = logits(windows)
        nll = F.cross_entropy(lg[:, :-1].reshape(-1, 128), windows[:, 1:].reshape(-1))
    got = perplexity(logits, windows, batch_size=3, progress=False)
    assert got == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_nan_logits_are_an_error():
    class Broken(Uniform):
        def forward(self, ids):
            return torch.full((*ids.shape, self.vocab), float("nan"))

    with pytest.raises(FloatingPointError, match="non-finite"):
        perplexity(Broken(4), torch.zeros(1, 5, dtype=torch.long), progress=False)
