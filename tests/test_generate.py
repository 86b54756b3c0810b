"""Generation over the cached graph: greedy equals the uncached reference, batching,
sampling, EOS / stop strings / streaming, the CLI, and bad input (one line, exit code 2)."""

import json

import pytest
import torch
import transformers as T

import qfx
from qfx.cli import main
from qfx.generate import GenerationError, Generator
from tests.conftest import tiny_model

PROMPTS = [[5, 17, 99, 3, 42, 7], [11, 2], [64, 65, 66, 67]]


def greedy_without_cache(forward, prompt: list[int], n: int) -> list[int]:
    """Reference: re-run the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(forward(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def generator(llama):
    return Generator.from_model(llama, max_batch=4, max_length=32)


def test_unquantized_greedy_equals_transformers_generate(llama, generator):
    out = generator.generate(PROMPTS[0], max_new_tokens=10, eos_token_id=[])
    with torch.no_grad():
        hf = llama.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert out.tokens[0] == hf[0, len(PROMPTS[0]):].tolist()
    assert out.finish_reasons == ["length"] and out.new_tokens == 10 and out.prompt_tokens == 6


@pytest.mark.parametrize("recipe", ["w4 g32 asym kv4", "quarot w4 g-1 kv8"])
def test_quantized_greedy_equals_the_full_sequence_graph(recipe):
    qmodel = qfx.quantize(tiny_model("qwen2"), recipe, progress=False)
    out = qfx.generate(qmodel, PROMPTS[0], max_new_tokens=8, eos_token_id=[])
    assert out.tokens[0] == greedy_without_cache(qmodel, PROMPTS[0], 8)


def test_left_padded_batch_equals_each_prompt_alone(generator):
    batched = generator.generate(PROMPTS, max_new_tokens=8, eos_token_id=[])
    alone = [generator.generate([p], max_new_tokens=8, eos_token_id=[]).tokens[0] for p in PROMPTS]
    assert batched.tokens == alone
    assert batched.prompt_tokens == sum(map(len, PROMPTS)) and batched.new_tokens == 24


def test_sampling(generator):
    greedy = generator.generate(PROMPTS[:2], max_new_tokens=12, eos_token_id=[]).tokens
    sample = lambda **kw: generator.generate(PROMPTS[:2], max_new_tokens=12, eos_token_id=[], **kw).tokens  # noqa: E731
    assert sample(temperature=1.0, seed=3) == sample(temperature=1.0, seed=3)
    assert sample(temperature=1.0, seed=3) != sample(temperature=1.0, seed=4)
    assert sample(temperature=1.0, seed=3) != greedy
    # filters that leave only the most likely token are greedy whatever the seed
    assert sample(temperature=1.0, top_k=1, seed=5) == greedy
    assert sample(temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_eos_ends_a_row(generator):
    tokens = generator.generate(PROMPTS[1], max_new_tokens=10, eos_token_id=[]).tokens[0]
    eos = tokens[4]
    out = generator.generate(PROMPTS[1], max_new_tokens=10, eos_token_id=eos)
    assert out.tokens[0] == tokens[:tokens.index(eos)] and out.finish_reasons == ["eos"]


@pytest.fixture(scope="module")
def text_model(tiny_hf_dir):
    return T.AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval(), T.AutoTokenizer.from_pretrained(tiny_hf_dir)


def test_stop_strings_and_streaming(text_model):
    model, tokenizer = text_model
    gen = Generator.from_model(model, tokenizer, max_batch=1, max_length=40)
    full = gen.generate("The capital of France is", max_new_tokens=16, eos_token_id=[]).text[0]
    pieces = []
    streamed = gen.generate("The capital of France is", max_new_tokens=16, eos_token_id=[],
                            stream=lambda row, text: pieces.append(text))
    assert "".join(pieces) == streamed.text[0] == full
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = gen.generate("The capital of France is", max_new_tokens=16, eos_token_id=[], stop=[stop])
    assert cut.text[0] == full[:full.find(stop)] and cut.finish_reasons == ["stop"]


@pytest.mark.parametrize("call, message", [
    (lambda g: g.generate([list(range(30))], max_new_tokens=5), "exceed the cache's 32 slots"),
    (lambda g: g.generate([[1]] * 5, max_new_tokens=2), "5 prompts exceed the cache's batch of 4"),
    (lambda g: g.generate([[]], max_new_tokens=2), "empty prompt"),
    (lambda g: g.generate("some text", max_new_tokens=2), "need a tokenizer"),
    (lambda g: g.generate([[1]], max_new_tokens=2, stop=["x"]), "stop strings need a tokenizer"),
    (lambda g: g.generate([[1]], max_new_tokens=0), "max_new_tokens 0"),
    (lambda g: g.generate([[1]], temperature=-1), "temperature -1"),
    (lambda g: g.generate([[1]], top_p=0.0), "top_p 0.0"),
    (lambda g: Generator(g.graph, cuda_graphs=True), "CUDA graphs need a model on a CUDA device"),
    (lambda g: Generator(qfx.quantize(tiny_model("llama"), "w8", progress=False)), "no KV cache"),
])
def test_bad_input_is_refused_naming_it(generator, call, message):
    with pytest.raises(GenerationError, match=message):
        call(generator)


def _run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own checks (usage, then one line naming the argument)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, text_model):
    model, tokenizer = text_model
    path = tmp_path_factory.mktemp("gen") / "w4kv4"
    qfx.save(qfx.quantize(model, "w4 g32 asym kv4", progress=False), path, tokenizer=tokenizer)
    return path


def test_cli_generates_from_a_checkpoint(capsys, checkpoint):
    code, out, err = _run(capsys, "generate", "--model", checkpoint, "--prompt", "Hello", "--max-new-tokens", 6,
                          "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert {"text", "prompt_tokens", "new_tokens", "prefill_seconds", "decode_tokens_per_s", "peak_gpu_mb",
            "kv_cache_bytes", "finish_reasons"} <= result.keys()
    assert result["new_tokens"] <= 6 and result["kv_cache_bytes"] > 0
    assert out.startswith(result["text"])  # streamed before the JSON line


def test_cli_generates_from_an_unquantized_folder(capsys, tiny_hf_dir):
    code, out, err = _run(capsys, "generate", "--model", tiny_hf_dir, "--prompt", "Hello", "--prompt", "Hi there",
                          "--max-new-tokens", 3, "--json")
    assert code == 0, err
    assert len(json.loads(out.strip().splitlines()[-1])["text"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", 0], "--max-new-tokens: must be a positive integer, got 0"),
    (["--cuda-graphs", "on"], "--cuda-graphs on needs a CUDA device"),
    (["--prompt-file", "/no/such/prompt.txt"], "--prompt-file /no/such/prompt.txt"),
    (["--max-length", 3], "exceed the cache's 3 slots"),
    (["--temperature", -0.5], "--temperature: must be a number >= 0, got -0.5"),
])
def test_cli_bad_input_one_line_exit_2(capsys, checkpoint, args, message):
    code, out, err = _run(capsys, "generate", "--model", checkpoint, "--prompt", "Hello", *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line and not line.startswith(("usage:", " "))]  # argparse's usage
    assert len(lines) == 1 and message in lines[0]


def test_cli_checkpoint_without_tokenizer(capsys, tmp_path):
    qfx.save(qfx.quantize(tiny_model("llama"), "w8", progress=False), tmp_path / "m")
    code, _, err = _run(capsys, "generate", "--model", tmp_path / "m", "--prompt", "Hello")
    assert code == 2 and "holds no tokenizer" in err
