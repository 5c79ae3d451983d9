import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import DATA, byte_tokenizer
from sparsegpt_export.calibration import CalibrationError, get_calibration_data, load_eval_text

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_txt_windows(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text(TEXT.replace(". ", ".\r\n"))
    ids = get_calibration_data(str(f), tok, nsamples=5, seqlen=64, seed=0)
    assert ids.shape == (5, 64) and ids.dtype == torch.long
    assert torch.equal(ids, get_calibration_data(str(f), tok, nsamples=5, seqlen=64, seed=0))
    assert not torch.equal(ids, get_calibration_data(str(f), tok, nsamples=5, seqlen=64, seed=1))


def test_jsonl_parquet_and_strings(tmp_path, tok):
    docs = [TEXT[i:] for i in range(0, 200, 20)]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": docs}), p)
    a = get_calibration_data(str(j), tok, nsamples=4, seqlen=128)
    b = get_calibration_data(str(p), tok, nsamples=4, seqlen=128)
    c = get_calibration_data(docs, tok, nsamples=4, seqlen=128)
    assert a.shape == b.shape == c.shape == (4, 128)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_short_documents_are_concatenated(tok):
    docs = ["short text number %d." % i for i in range(100)]
    ids = get_calibration_data(docs, tok, nsamples=3, seqlen=64)
    assert ids.shape == (3, 64)


def test_pretokenized(tmp_path):
    t = torch.arange(40).reshape(4, 10)
    assert torch.equal(get_calibration_data(t, None, nsamples=2, seqlen=10), t[:2])
    f = tmp_path / "c.safetensors"
    save_file({"input_ids": t}, str(f))
    assert torch.equal(get_calibration_data(str(f), None, nsamples=3, seqlen=8), t[:3, :8])
    with pytest.warns(UserWarning, match="fewer than nsamples"):
        assert get_calibration_data(t, None, nsamples=9, seqlen=10).shape == (4, 10)


def test_too_few_tokens(tmp_path, tok):
    with pytest.raises(CalibrationError, match="seqlen=64"):
        get_calibration_data(torch.zeros(4, 16, dtype=torch.long), None, nsamples=4, seqlen=64)
    with pytest.raises(CalibrationError, match="fewer calibration tokens than seqlen"):
        get_calibration_data(["tiny"], tok, nsamples=2, seqlen=64)
    f = tmp_path / "s.txt"
    f.write_text("only a few words")
    with pytest.raises(CalibrationError, match=str(f)):
        get_calibration_data(str(f), tok, nsamples=2, seqlen=64)


def test_bad_files(tmp_path, tok):
    with pytest.raises(CalibrationError, match="not found"):
        get_calibration_data(str(tmp_path / "missing.jsonl"), tok)
    f = tmp_path / "x.safetensors"
    save_file({"ids": torch.zeros(2, 2)}, str(f))
    with pytest.raises(CalibrationError, match="input_ids"):
        get_calibration_data(str(f), None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2"):
        get_calibration_data(str(bad), tok)


def test_offline_hub_name_says_pass_a_local_file(monkeypatch, tok):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="local"):
        get_calibration_data("c4", tok, nsamples=2, seqlen=16)


@pytest.mark.skipif(not (DATA / "calib-smollm2-c4-128x512.safetensors").is_file(), reason="shared data not present")
def test_shared_fixed_tokens():
    ids = get_calibration_data(str(DATA / "calib-smollm2-c4-128x512.safetensors"), None, nsamples=128, seqlen=512)
    assert ids.shape == (128, 512)
    text = load_eval_text(DATA / "c4-validation-2k.parquet", (1000, 1010))
    assert len(text) > 1000 and "\r\n" not in text
