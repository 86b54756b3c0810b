"""Text generation over the cached graph: prefill, then one token at a time.

    gen = qfx.Generator.from_model("out/w4", max_batch=4, max_length=1024)   # or a qmodel / HF model
    out = gen.generate(["The capital of France is", "Hi"], max_new_tokens=32, temperature=0.7, seed=0)
    out.text                                                               # one string per prompt

Prompts of different lengths are left-padded so that every row writes the same cache slots:
row r's real tokens sit in slots [P - len_r, P) of a P-token prefill and take positions
0..len_r-1; `attention_mask` (B, length) marks the real slots. On CUDA the prefill and the
one-token decode step are compiled with the "qfx" backend (its Triton kernels), the decode
step replayed as a CUDA graph; elsewhere they run as they are (eager) unless `compile=True`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule


SYNC_EVERY = 16  # decode steps between reads of the new tokens when nothing is streamed


class GenerationError(ValueError):
    """A prompt, setting or model that generation cannot take; the message says which."""


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens of each prompt (up to its EOS / stop string)
    text: list[str] | None  # their decoded text (None without a tokenizer)
    prompt_tokens: int  # real (unpadded) prompt tokens, all rows
    new_tokens: int  # tokens generated, all rows
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_s: float  # rows x decode steps / decode time
    kv_cache_bytes: int
    peak_gpu_mb: float | None
    finish_reasons: list[str] = field(default_factory=list)  # "eos", "stop", "length" per row


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 = no filtering."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise GenerationError(f"top_k {self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p {self.top_p} must be in (0, 1]")

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """logits (B, V) -> next tokens (B,)."""
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """A generation graph (`qfx.generation_graph`) and the loop around it."""

    def __init__(self, graph: GraphModule, tokenizer=None, compile: bool | None = None,
                 cuda_graphs: bool | None = None):
        """compile: prefill and decode compiled with the "qfx" backend (default: on CUDA);
        cuda_graphs: the compiled decode step replayed as a CUDA graph (default: when compiled on CUDA)."""
        info = graph.meta.get("qfx", {}).get("kv_cache")
        if info is None:
            raise GenerationError("Generator takes a graph from qfx.generation_graph (it has no KV cache)")
        self.graph, self.tokenizer = graph, tokenizer
        self.max_batch, self.length = info["max_batch"], info["length"]
        self.device = next(iter(graph.kv_cache.buffers())).device
        if compile is None:
            compile = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise GenerationError(f"CUDA graphs need a model on a CUDA device; this one is on {self.device}")
        if cuda_graphs and compile is False:
            raise GenerationError("CUDA graphs replay the compiled decode step: leave compile on")
        cuda_graphs = compile and self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._prefill, self._decode = graph, graph
        if compile:
            for b in graph.kv_cache.buffers():  # mutated in place by each step: fixed addresses for CUDA graphs
                torch._dynamo.mark_static_address(b)
            decode = GraphModule(graph, graph.graph)  # same tensors, its own compiled code
            options = {"triton.cudagraphs": True} if cuda_graphs else {}
            self._decode = torch.compile(decode, backend="qfx", dynamic=False, options=options)
            self._prefill = torch.compile(graph, backend="qfx", dynamic=True)

    @classmethod
    def from_model(cls, model, tokenizer=None, max_batch: int = 1, max_length: int = 2048,
                   device: str | torch.device | None = None, compile: bool | None = None,
                   cuda_graphs: bool | None = None) -> "Generator":
        """model: a qfx checkpoint folder, an imported compressed-tensors / GPTQ folder, a
        quantized graph, or a Hugging Face causal LM (unquantized); its tokenizer is taken from
        the folder when not given."""
        from qfx.generation_graph import generation_graph

        model, tokenizer = _resolve(model, tokenizer, device)
        with torch.no_grad():
            graph = generation_graph(model, max_batch, max_length)
        return cls(graph, tokenizer, compile, cuda_graphs)

    def kv_cache_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.graph.kv_cache.children())

    def _encode(self, prompts) -> list[list[int]]:
        rows = encode(prompts, self.tokenizer)
        if len(rows) > self.max_batch:
            raise GenerationError(f"{len(rows)} prompts exceed the cache's batch of {self.max_batch}; "
                                  "build the generator with a larger max_batch")
        return rows

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 stop: Sequence[str] = (), stream: Callable[[int, str], None] | None = None) -> GenerationOutput:
        """Generate up to `max_new_tokens` after each prompt.

        prompts: a string, a list of strings (needs a tokenizer), token ids (S,) / (B, S), or
            lists of ids; tokens are used as given (no special tokens added).
        eos_token_id: ends a row (default: the tokenizer's); stop: strings that end a row (the
            text is cut before them).
        stream: called as stream(row, text) with each row's new text as it is decided.
        """
        sampling = Sampling(temperature, top_k, top_p, seed)
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens {max_new_tokens} must be >= 1")
        rows = self._encode(prompts)
        b, p = len(rows), max(len(r) for r in rows)
        if p + max_new_tokens > self.length:
            raise GenerationError(f"prompt of {p} tokens + {max_new_tokens} new ones exceed the cache's {self.length} "
                                  "slots; build the generator with a larger max_length")
        eos = self._eos(eos_token_id)
        if stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer to decode the text")
        dev = self.device
        pad = [p - len(r) for r in rows]
        ids = torch.tensor([[0] * k + r for k, r in zip(pad, rows)], device=dev)
        positions = torch.stack([(torch.arange(p) - k).clamp(min=0) for k in pad]).to(dev)
        mask = torch.zeros(b, self.length, dtype=torch.bool, device=dev)
        for i, k in enumerate(pad):
            mask[i, k:p] = True
        generator = None
        if seed is not None:
            generator = torch.Generator(device=dev).manual_seed(seed)
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        new: list[list[int]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        texts, shown = [""] * b, [0] * b
        with torch.no_grad():
            start = self._sync(time.perf_counter())
            logits = self._prefill(ids, positions, torch.arange(p, device=dev), mask)[:, -1]
            token = sampling.pick(logits, generator)
            prefill_seconds = self._sync(time.perf_counter()) - start
            start, steps = time.perf_counter(), 0
            pos, slot = positions[:, -1:], torch.tensor([p], device=dev)
            # tokens are read back to the host every `every` steps (each read waits for the GPU):
            # at every step only when text must be streamed or checked for stop strings
            every = 1 if (stop or stream) else SYNC_EVERY
            pending = [token]
            for t in range(max_new_tokens):
                last = t == max_new_tokens - 1
                if len(pending) == every or last:
                    self._take(torch.stack(pending, 1).tolist(), new, eos, reasons, texts, shown, stop, stream)
                    pending = []
                    if all(r != "length" for r in reasons):
                        break
                if last:
                    break
                mask[:, p + t] = True
                pos = pos + 1
                logits = self._decode(token.view(b, 1).contiguous(), pos, slot, mask)
                slot = slot + 1
                token = sampling.pick(logits[:, -1], generator)
                pending.append(token)
                steps += 1
            decode_seconds = self._sync(time.perf_counter()) - start
        text = None
        if self.tokenizer is not None:
            text = [texts[i] if stop else self.tokenizer.decode(new[i], skip_special_tokens=True) for i in range(b)]
            if stream:
                for i in range(b):
                    if len(text[i]) > shown[i]:
                        stream(i, text[i][shown[i]:])
        return GenerationOutput(
            tokens=new, text=text, prompt_tokens=sum(len(r) for r in rows), new_tokens=sum(len(n) for n in new),
            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
            decode_tokens_per_s=b * steps / decode_seconds if steps and decode_seconds > 0 else 0.0,
            kv_cache_bytes=self.kv_cache_bytes(),
            peak_gpu_mb=torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None, finish_reasons=reasons)

    def _take(self, chunk: list[list[int]], new, eos, reasons, texts, shown, stop, stream) -> None:
        """Append each row's tokens (B lists of k) up to its EOS or stop string."""
        for i, row in enumerate(chunk):
            for tok in row:
                if reasons[i] != "length":
                    break
                if tok in eos:
                    reasons[i] = "eos"
                    break
                new[i].append(tok)
                if self.tokenizer is not None and (stop or stream):
                    self._emit(i, new[i], texts, shown, stop, reasons, stream)

    def _eos(self, eos_token_id) -> set[int]:
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            return set()
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}

    def _emit(self, i, tokens, texts, shown, stop, reasons, stream) -> None:
        """Decode row i, cut it at a stop string, stream the part no stop string can still change."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hit = min((text.find(s) for s in stop if s in text), default=-1)
        if hit >= 0:
            text, reasons[i] = text[:hit], "stop"
        texts[i] = text
        # hold back a tail that may yet become a stop string, and an incomplete UTF-8 character
        hold = 0 if hit >= 0 else max([len(s) - 1 for s in stop] + [0])
        ready = len(text.rstrip("\ufffd")) - hold
        if stream and ready > shown[i]:
            stream(i, text[shown[i]:ready])
            shown[i] = ready

    def _sync(self, now: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return now


def encode(prompts, tokenizer=None) -> list[list[int]]:
    """Prompts (a string, strings, token ids (S,) / (B, S), a list of ids, or lists of ids) -> lists of ids."""
    if isinstance(prompts, torch.Tensor):
        rows = [prompts.tolist()] if prompts.ndim == 1 else prompts.tolist()
    elif isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], str)):
        if tokenizer is None:
            raise GenerationError("text prompts need a tokenizer: pass tokenizer=, or token ids")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
        rows = [list(prompts)]  # one prompt's ids
    else:
        rows = [list(map(int, r)) for r in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise GenerationError("empty prompt: give at least one token of text per prompt")
    return rows


def _resolve(model, tokenizer, device):
    """(model, tokenizer) from a folder path, a quantized graph or a Hugging Face model."""
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        from qfx.formats import load_tokenizer
        from qfx.io import load

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        return load(model, device or "cpu"), tokenizer
    return (model if device is None else model.to(device)), tokenizer


def generate(model, prompts, max_new_tokens: int = 32, tokenizer=None, device: str | torch.device | None = None,
             max_length: int | None = None, compile: bool | None = None, **options) -> GenerationOutput:
    """One call: a generator whose cache fits these prompts (or `max_length` slots), then
    `Generator.generate(prompts, max_new_tokens, **options)`.

    model: as `Generator.from_model` takes it. options: temperature, top_k, top_p, seed,
    eos_token_id, stop, stream (see `Generator.generate`).
    """
    from qfx.generation_graph import generation_graph

    model, tokenizer = _resolve(model, tokenizer, device)
    rows = encode(prompts, tokenizer)
    length = max_length or max(len(r) for r in rows) + max(max_new_tokens, 1)
    with torch.no_grad():
        graph = generation_graph(model, len(rows), length)
    return Generator(graph, tokenizer, compile).generate(rows, max_new_tokens, **options)
