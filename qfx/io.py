"""Save / load the native qfx format, and export quantized graphs as torch.export programs.

Native format, a folder:
    qfx.json            format version, recipe, the captured model's source (HF config, dtype),
                        tensor aliases (tied weights), library versions
    model.safetensors   every tensor the graph reads: packed weights, scales, zero points,
                        full-precision parameters and buffers (a model quantized from disk,
                        `qfx.stream`, has shards model-00001.safetensors, ... and their index)
    tokenizer files     when a tokenizer was given
Loading rebuilds the graph from the config (on the meta device, so nothing is initialised),
re-runs the same passes to lay out the quantized ops, and fills every tensor from the file,
checking names, shapes and dtypes. No pickled code is ever loaded.
Writes go to a temporary sibling folder that is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.fx import GraphModule

from qfx.capture import capture, hf_dynamic_shapes
from qfx.graph import get_attr_tensor, set_attr_tensor
from qfx.checkpoint_folder import CheckpointError, atomic_dir
from qfx.config import Recipe
from qfx.pipeline import for_tensors
from qfx.weight_files import SINGLE_FILE as WEIGHTS_FILE, WeightFiles

FORMAT = "qfx"
FORMAT_VERSION = 2  # 2: online rotations of sizes 156 * 2^k and 172 * 2^k use Hadamard matrices
META_FILE = "qfx.json"



def tensor_targets(gm: GraphModule) -> list[str]:
    """The get_attr targets of `gm` that hold tensors, each once, in graph order."""
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and isinstance(get_attr_tensor(gm, n.target), torch.Tensor):
            seen[n.target] = None
    return list(seen)


def save(qmodel: GraphModule, path: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `qmodel` (from qfx.convert / qfx.quantize) to folder `path`; returns the path."""
    info = qmodel.meta.get("qfx", {})
    if "recipe" not in info:
        raise CheckpointError("save() takes a model returned by qfx.quantize or qfx.convert")
    source = info.get("source", {})
    if source.get("kind") != "hf_causal_lm":
        raise CheckpointError(
            f"save() rebuilds models from a Hugging Face config; {source.get('class', 'this model')} has none. "
            "Use qfx.export(qmodel, 'model.pt2') for other modules"
        )
    tensors, aliases = {}, {}
    by_storage: dict[tuple, str] = {}
    for target in tensor_targets(qmodel):
        t = get_attr_tensor(qmodel, target).detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in by_storage:
            aliases[target] = by_storage[key]  # tied weights are stored once
            continue
        if key is not None:
            by_storage[key] = target
        tensors[target] = t.contiguous().cpu()
    with atomic_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(checkpoint_meta(qmodel, aliases), indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)


def checkpoint_meta(qmodel: GraphModule, aliases: dict[str, str]) -> dict:
    """What qfx.json holds for `qmodel` (a converted graph, or its layout from `for_tensors`)."""
    info = qmodel.meta["qfx"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": info["recipe"],
        "source": info.get("source", {}),
        "aliases": aliases,
        "counts": info.get("counts", {}),
        "versions": _versions(),
    }


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> GraphModule:
    """Load a quantized model folder as a graph of qfx ops.

    A qfx folder (from `save`) reloads bit-identically; a compressed-tensors or GPTQ folder
    (config.json with a quantization_config, e.g. from `export` or another tool) is imported.
    """
    path = Path(path)
    if not (path / META_FILE).is_file() and (path / "config.json").is_file():
        return _import_foreign(path, device)
    meta = read_meta(path)
    weights = WeightFiles(path)  # model.safetensors, or shards and their index (a streamed result)
    gm = rebuild(meta, device)
    aliases = meta.get("aliases", {})
    targets = tensor_targets(gm)
    read: dict[str, torch.Tensor] = {}  # by stored name: tied targets share one tensor
    for target in targets:
        name = aliases.get(target, target)
        if name not in weights:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        if name not in read:
            read[name] = weights.tensor(name)
        expected, found = get_attr_tensor(gm, target), read[name]
        if tuple(found.shape) != tuple(expected.shape) or found.dtype != expected.dtype:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {tuple(found.shape)} {found.dtype}, "
                f"the model expects {tuple(expected.shape)} {expected.dtype}"
            )
        set_attr_tensor(gm, target, found.to(expected.device))
    unused = set(weights.names()) - set(read)
    if unused:
        raise CheckpointError(f"{path}: tensors not used by the model: {sorted(unused)[:5]}")
    return gm


def _import_foreign(path: Path, device) -> GraphModule:
    try:
        method = json.loads((path / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: corrupt ({e})") from None
    if method == "compressed-tensors":
        from qfx.formats.compressed_tensors import import_compressed_tensors

        return import_compressed_tensors(path, device)
    if method == "gptq":
        from qfx.formats.gptq import import_gptq

        return import_gptq(path, device)
    raise CheckpointError(f"{path}: unknown checkpoint format (quant_method {method!r}); "
                          "qfx reads qfx, compressed-tensors and gptq folders")


def read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    f = path / META_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: not a qfx checkpoint (no {META_FILE})")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: corrupt ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{f}: format {meta.get('format')!r} v{meta.get('format_version')} is not one this qfx reads")
    return meta


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def rebuild(meta: dict, device: str | torch.device = "cpu") -> GraphModule:
    """The quantized graph described by `meta`, with uninitialised tensors on `device`.

    A captured graph is specific to the device it was traced on, so it is traced there.
    """
    gm = for_tensors(capture(empty_model(meta["source"], device)), Recipe.from_dict(meta["recipe"]))
    if meta.get("format_version", 1) < 2:
        _check_v1_rotations(gm)
    gm.meta["qfx"]["recipe"] = meta["recipe"]
    return gm


def empty_model(source: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The Hugging Face model a captured graph's `source` describes, with uninitialised tensors
    on `device` in the dtypes they had at capture (built on the meta device: nothing is initialised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(**source["config"])
    except Exception as e:
        raise CheckpointError(f"cannot rebuild the model config ({source.get('class')}): {e}") from None
    dtype = getattr(torch, source.get("dtype") or "float32")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    _restore_dtypes(model, source.get("tensor_dtypes", {}))
    return model.eval()


def copy_tensors(src: torch.nn.Module, dst: GraphModule, where: str) -> None:
    """Fill every tensor `dst`'s graph reads from the tensor of the same name in `src`, checking
    shapes and dtypes (`where` names the source in errors)."""
    for target in tensor_targets(dst):
        expected = get_attr_tensor(dst, target)
        try:
            found = get_attr_tensor(src, target)
        except AttributeError:
            raise CheckpointError(f"{where}: tensor {target!r} is missing") from None
        if tuple(found.shape) != tuple(expected.shape) or found.dtype != expected.dtype:
            raise CheckpointError(f"{where}: tensor {target!r} is {tuple(found.shape)} {found.dtype}, "
                                  f"the model expects {tuple(expected.shape)} {expected.dtype}")
        set_attr_tensor(dst, target, found.to(expected.device))


def _check_v1_rotations(gm: GraphModule) -> None:
    """Refuse a format-1 model whose online rotations this version computes differently."""
    from qfx.algorithms.hadamard import online_factor_changed_since_v1

    sizes = {n.meta["val"].shape[-1] for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.qfx.hadamard.default}
    changed = sorted(n for n in sizes if online_factor_changed_since_v1(n))
    if changed:
        raise CheckpointError(f"this checkpoint (format 1) rotates activations of size {changed[0]} online with a "
                              "random orthogonal factor; this qfx uses a Hadamard matrix there, so the model would "
                              "not reload as saved. Quantize the original model again with this version")


def _restore_dtypes(model: torch.nn.Module, dtypes: dict[str, str]) -> None:
    """Cast each parameter / buffer to the dtype it had when the model was captured."""
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        want = dtypes.get(name)
        if want is not None and str(t.dtype).removeprefix("torch.") != want:
            set_attr_tensor(model, name, t.data.to(getattr(torch, want)))


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# -- torch.export programs ----------------------------------------------------------------


EXPORT_FORMATS = ("pt2", "compressed-tensors", "gptq")


def export(
    qmodel: GraphModule,
    path: str | os.PathLike,
    example_inputs: tuple | None = None,
    format: str = "pt2",
    tokenizer=None,
) -> Path:
    """Write `qmodel` for another runtime.

    format "pt2": a torch.export program (reload with `load_exported`); HF-captured models
        get dynamic batch and sequence dimensions.
    format "compressed-tensors" / "gptq": a Hugging Face folder that vLLM and transformers
        load (see qfx.formats); `tokenizer` is saved into it when given.
    """
    path = Path(path)
    if format not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if format == "compressed-tensors":
        from qfx.formats.compressed_tensors import export_compressed_tensors

        export_compressed_tensors(qmodel, path, tokenizer)
        return path
    if format == "gptq":
        from qfx.formats.gptq import export_gptq

        export_gptq(qmodel, path, tokenizer)
        return path
    source = qmodel.meta.get("qfx", {}).get("source", {})
    dynamic = None
    if example_inputs is None:
        if source.get("kind") != "hf_causal_lm":
            raise CheckpointError("export() needs example_inputs for models not captured from a Hugging Face LM")
        vocab = int(source["config"].get("vocab_size", 32))
        device = next(iter(qmodel.buffers())).device
        example_inputs = (torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device),)
        max_seq = int(source["config"].get("max_position_embeddings") or 8192)
        dynamic = hf_dynamic_shapes(max_seq)
    ep = torch.export.export(qmodel, example_inputs, dynamic_shapes=dynamic)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        torch.export.save(ep, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_exported(path: str | os.PathLike) -> torch.nn.Module:
    """Load a .pt2 written by `export` as a runnable module (needs `import qfx` for its ops).

    The archive is checked first so that loading runs no pickled code: tensors must be raw
    bytes, and sample inputs must load with `weights_only=True` (torch.export.load would
    otherwise retry them with full unpickling).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such exported program")
    _check_no_pickled_code(path)
    return torch.export.load(str(path)).module()


def _check_no_pickled_code(path: Path) -> None:
    import io
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: not a .pt2 archive") from None
    with archive:
        for name in archive.namelist():
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                entries = json.loads(archive.read(name)).get("config", {})
                pickled = [k for k, v in entries.items() if v.get("use_pickle")]
                if pickled:
                    raise CheckpointError(f"{path}: tensors stored as pickles ({pickled[:3]}); refusing to unpickle")
            elif "/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as e:
                    raise CheckpointError(f"{path}: {name} needs unpickling beyond tensors ({type(e).__name__}); "
                                          "refusing to load it") from None
