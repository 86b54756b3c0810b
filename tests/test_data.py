import json

import pytest
import torch

from qfx.data import DataError, calibration_samples, eval_windows, read_text


def test_read_txt_json_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.json").write_text(json.dumps({"x": {"title": "T", "extract": "one"}, "y": {"text": "two"}}))
    (tmp_path / "c.jsonl").write_text('{"text": "first"}\n\n"second"\n')
    assert read_text(str(tmp_path / "a.txt")) == "hello world"
    assert read_text(str(tmp_path / "b.json")) == "one\ntwo"
    assert read_text(str(tmp_path / "c.jsonl")) == "first\nsecond"


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        read_text(str(tmp_path / "bad.jsonl"))


def test_eval_windows_are_consecutive_and_checked():
    tokens = torch.arange(100)
    w = eval_windows(tokens, 30)
    assert w.shape == (3, 30) and torch.equal(w.reshape(-1), tokens[:90])
    assert eval_windows(tokens, 30, 2).shape == (2, 30)
    with pytest.raises(DataError, match="shorter than one window"):
        eval_windows(tokens, 101)
    with pytest.raises(DataError, match="holds 3"):
        eval_windows(tokens, 30, 4)


def test_calibration_samples_are_deterministic_per_seed():
    tokens = torch.arange(1000)
    a = calibration_samples(tokens, 4, 16, seed=1)
    assert a.shape == (4, 16)
    assert torch.equal(a, calibration_samples(tokens, 4, 16, seed=1))
    assert not torch.equal(a, calibration_samples(tokens, 4, 16, seed=2))
    assert bool((a[:, 1:] - a[:, :-1] == 1).all())  # contiguous spans of the text
    with pytest.raises(DataError, match="need more than"):
        calibration_samples(tokens[:10], 1, 16)
