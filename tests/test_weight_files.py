"""Reading safetensors folders tensor by tensor, writing shards as tensors come."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qfx.checkpoint_folder import CheckpointError
from qfx.weight_files import INDEX_FILE, ShardWriter, WeightFiles


def test_shards_written_as_tensors_come_read_back_by_name(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    writer = ShardWriter(tmp_path, shard_bytes=900)  # two float32 10 x 10 tensors (800 B) per shard
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"model-0000{i}.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    files = WeightFiles(tmp_path)
    assert sorted(files.names()) == sorted(tensors)
    assert all(torch.equal(files.tensor(n), t) for n, t in tensors.items())
    with pytest.raises(CheckpointError, match="written twice"):
        writer.add("t0", tensors["t0"])


def test_a_folder_of_bin_files_is_refused_with_how_to_convert(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only PyTorch \.bin weights.*save_pretrained"):
        WeightFiles(tmp_path)


def test_missing_shards_named_in_the_index_are_named(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model-00001.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors",
                                                                  "b": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002.safetensors"):
        WeightFiles(tmp_path)


@pytest.mark.parametrize("content, message", [(None, "no model.safetensors or model.safetensors.index.json"),
                                              ("{", "corrupt index")])
def test_a_folder_without_readable_weights_says_so(tmp_path, content, message):
    if content is not None:
        (tmp_path / INDEX_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        WeightFiles(tmp_path)
