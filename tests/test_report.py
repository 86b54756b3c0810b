import json

import pytest
import torch

import qfx
from qfx.report import kurtosis, layer_report, sqnr_db, write_report
from tests.conftest import tiny_model


def test_statistics():
    x = torch.randn(200000, generator=torch.Generator().manual_seed(0))
    assert kurtosis(x) == pytest.approx(3.0, abs=0.1)
    x = x.double()
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-9)  # noise = 0.1 * signal


def test_report_rows_files_and_ordering(tmp_path):
    model = tiny_model("llama")
    batches = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    rows4 = layer_report(model, qfx.quantize(model, "w4 g32 rule:down_proj=w8"), batches)
    assert len(rows4) == 14 and rows4[0]["tokens"] == 48
    by = {r["layer"]: r for r in rows4}
    # 8-bit layers have far less error than 4-bit ones
    assert by["model.layers.0.mlp.down_proj"]["weight_sqnr_db"] > by["model.layers.0.mlp.up_proj"]["weight_sqnr_db"] + 15
    assert all(0.9 < r["output_cosine"] <= 1.0 for r in rows4)
    out = write_report(rows4, tmp_path / "rep")
    assert json.loads((out / "report.json").read_text()) == rows4
    assert "model.layers.0.mlp.down_proj" in (out / "report.md").read_text()
    for png in ("error_by_layer.png", "outliers_by_layer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
