"""The static KV cache: slot masks, stored codes, attention over the cache."""

import pytest
import torch

import qfx.ops  # noqa: F401  (registers qfx::quantize_kv)
from qfx.kv_cache import CachedAttention, cache_mask


def test_cache_mask_left_padding():
    # row 0: 3 real tokens in slots 0..2; row 1: one pad (slot 0), real tokens in slots 1..2
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    m = cache_mask(torch.arange(3), attention_mask)
    assert m.shape == (2, 1, 3, 5)
    assert m[0, 0].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    # the pad token sees only itself (no empty softmax row); real tokens never see the pad
    assert m[1, 0].tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0]]


def _qkv(b, heads, kv_heads, s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, s, d, generator=g), torch.randn(b, kv_heads, s, d, generator=g),
            torch.randn(b, kv_heads, s, d, generator=g))


@pytest.mark.parametrize("bits,group", [(4, 0), (8, 0), (4, 8), (2, 16)])
def test_stored_codes_read_back_as_the_graphs_fake_quantization(bits, group):
    """The cache stores codes; read back they are exactly what qfx::quantize_kv makes of the
    same keys and values (the full-sequence graph's values), bit for bit."""
    q, k, v = _qkv(2, 4, 2, 5, 32)
    layer = CachedAttention(3, 2, 8, 32, torch.float32, "cpu", None, bits, group)
    layer(q, k, v, torch.arange(2, 7), cache_mask(torch.arange(2, 7), torch.ones(2, 8, dtype=torch.bool)))
    for name, x in (("key", k), ("value", v)):
        stored = layer._read(name, 2, torch.float32)[:, :, 2:7]
        assert torch.equal(stored, torch.ops.qfx.quantize_kv(x, bits, group))
    assert layer.key_codes.dtype == torch.uint8 and layer.key_codes.shape[-1] == 32 * bits // 8


def test_attention_over_cache_equals_causal_sdpa_one_token_at_a_time():
    """Writing a sequence one token at a time and attending over the cache gives causal SDPA
    over the whole sequence with grouped-query heads (float64, exact up to summation order)."""
    q, k, v = (t.double() for t in _qkv(2, 4, 2, 6, 16, seed=3))
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    layer = CachedAttention(2, 2, 10, 16, torch.float64, "cpu", None)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    outs = []
    for t in range(6):
        mask[:, t] = True
        pos = torch.tensor([t])
        outs.append(layer(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pos, cache_mask(pos, mask)))
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kv4_cache_bytes_at_most_030_of_bf16(head_dim):
    bf16 = CachedAttention(4, 8, 256, head_dim, torch.bfloat16, "cpu", None).nbytes()
    kv4 = CachedAttention(4, 8, 256, head_dim, torch.bfloat16, "cpu", None, kv_bits=4).nbytes()
    # per slot and head: D/2 bytes of codes + 4 (scale) + 1 (zero) against 2D bytes
    assert kv4 == 4 * 8 * 256 * 2 * (head_dim // 2 + 5)
    assert kv4 <= 0.30 * bf16
