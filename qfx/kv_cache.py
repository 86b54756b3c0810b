"""A static KV cache per attention layer, stored in full precision or as packed integer codes,
and the attention over it.

Layout (per layer): keys and values of `max_batch` rows, `kv_heads` heads and `length` slots,
(max_batch, kv_heads, length, head_dim) in the model dtype; or, with a `kvN` recipe, codes
packed N bits each along the head dim, (max_batch, kv_heads, length, ceil(head_dim/8)*N)
uint8, with a float32 scale and a uint8 zero point per slot, head and group of the head dim
(max_batch, kv_heads, length, groups). Slot i holds the token at cache position i; prompts of
different lengths are left-padded so that all rows share the slots, and `attention_mask`
(B, length) says which slots hold a real token of each row.

Codes are those `qfx::quantize_kv` rounds to (`qfx.primitives.quantize_kv_rows`), so attention
over this cache reads exactly the values the full-sequence graph's fake-quantized keys and
values hold.
"""

from __future__ import annotations

import torch

from qfx import primitives as P


def cache_mask(cache_position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Which slots each new token attends to: (B, 1, S, length) bool.

    cache_position (S,) int64: the slots the S new tokens are written to (ascending);
    attention_mask (B, length) bool: the slots holding a real token of each row.
    A token sees the real tokens at or before its slot; a padding token sees only itself, so
    that no row of the softmax is empty (its output is never read by a real token).
    """
    slots = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    at = cache_position.unsqueeze(-1)  # (S, 1)
    causal = slots <= at  # (S, length)
    visible = attention_mask[:, None, None, :] & causal | (slots == at)
    return visible


class CachedAttention(torch.nn.Module):
    """One attention layer: write the new keys and values into the cache, attend over it.

    forward(q (B, H, S, D), k (B, KVH, S, D), v (B, KVH, S, D), cache_position (S,),
    mask (B, 1, S, length)) -> (B, H, S, D), as `scaled_dot_product_attention` with the
    layer's `scale`; heads share kv heads in blocks of H / KVH (grouped-query attention).
    """

    def __init__(self, max_batch: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, scale: float | None, kv_bits: int | None = None, kv_group: int = 0):
        super().__init__()
        self.scale, self.kv_bits, self.kv_group, self.head_dim = scale, kv_bits, kv_group, head_dim
        shape = (max_batch, kv_heads, length)
        for name in ("key", "value"):
            if kv_bits is None:
                self.register_buffer(name, torch.zeros(*shape, head_dim, dtype=dtype, device=device), persistent=False)
                continue
            groups = P.n_groups(head_dim, kv_group or head_dim)
            width = P.packed_width(head_dim, kv_bits)
            self.register_buffer(f"{name}_codes", torch.zeros(*shape, width, dtype=torch.uint8, device=device),
                                 persistent=False)
            self.register_buffer(f"{name}_scale", torch.ones(*shape, groups, dtype=torch.float32, device=device),
                                 persistent=False)
            self.register_buffer(f"{name}_zero", torch.zeros(*shape, groups, dtype=torch.uint8, device=device),
                                 persistent=False)

    def _write(self, name: str, x: torch.Tensor, cache_position: torch.Tensor) -> None:
        b = x.shape[0]
        if self.kv_bits is None:
            getattr(self, name)[:b].index_copy_(2, cache_position, x)
            return
        codes, scale, zero = P.quantize_kv_rows(x, self.kv_bits, self.kv_group)
        getattr(self, f"{name}_codes")[:b].index_copy_(2, cache_position, P.pack(codes, self.kv_bits))
        getattr(self, f"{name}_scale")[:b].index_copy_(2, cache_position, scale)
        getattr(self, f"{name}_zero")[:b].index_copy_(2, cache_position, zero)

    def _read(self, name: str, batch: int, dtype: torch.dtype) -> torch.Tensor:
        if self.kv_bits is None:
            return getattr(self, name)[:batch]
        codes = P.unpack(getattr(self, f"{name}_codes")[:batch], self.kv_bits, self.head_dim)
        return P.dequantize_kv_rows(codes, getattr(self, f"{name}_scale")[:batch], getattr(self, f"{name}_zero")[:batch],
                                    self.kv_bits, self.kv_group, dtype)

    def forward(self, q, k, v, cache_position, mask):
        self._write("key", k, cache_position)
        self._write("value", v, cache_position)
        keys, values = self._read("key", q.shape[0], q.dtype), self._read("value", q.shape[0], q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=q.shape[1] != keys.shape[1])

    def nbytes(self) -> int:
        """Bytes the cache holds (codes, scales and zero points included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())
