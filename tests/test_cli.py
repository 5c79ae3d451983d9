import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import compress_tiny, nm_holds
from sparsegpt_export.cli import main
from sparsegpt_export.config import SparseGPTConfig
from sparsegpt_export.io import load_records


def test_compress_writes_a_plain_checkpoint(saved_tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert compress_tiny(saved_tiny, out, "--pattern", "2:4", "--bits", "4") == 0
    assert "compressed 14 layers" in capsys.readouterr().out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "sparsegpt_config.json", "sparsegpt_report.json",
              "sparsegpt_quant.safetensors"):
        assert (out / f).is_file(), f
    cfg = SparseGPTConfig.from_json_file(out / "sparsegpt_config.json")
    assert cfg.pattern == "2:4" and cfg.bits == 4 and cfg.group_size == 32
    report = json.loads((out / "sparsegpt_report.json").read_text())
    assert len(report["layers"]) == 14
    # plain transformers, in a process that never imports sparsegpt_export
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "w = m.model.layers[1].mlp.up_proj.weight\n"
        "assert (w.reshape(w.shape[0], -1, 4).ne(0).sum(-1) <= 2).all()\n"
        "assert 'sparsegpt_export' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    # the sidecar gives back the exact integer codes
    from safetensors.torch import load_file

    recs = load_records(out)
    w = load_file(str(out / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    rec = recs["model.layers.1.mlp.up_proj"]
    s = rec.scales.float().repeat_interleave(32, dim=1)
    codes = w / s + 8
    assert torch.allclose(codes, codes.round(), atol=1e-4)


def test_eval_prints_perplexity(saved_tiny, tmp_path, capsys):
    d, _ = saved_tiny
    txt = tmp_path / "t.txt"
    txt.write_text("hello world, this is evaluation text. " * 30)
    assert main(["eval", str(d), "--dataset", str(txt), "--seqlen", "64", "--windows", "2", "--no-progress",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert "perplexity" in capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["windows"] == 2 and r["ppl"] > 1


@pytest.mark.parametrize("pattern", ["3:2", "0:4"])
def test_bad_pattern_is_one_clear_line(saved_tiny, tmp_path, capsys, pattern):
    assert compress_tiny(saved_tiny, tmp_path / "o", "--pattern", pattern) == 2
    err = capsys.readouterr().err
    assert "error: pattern" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_non_writable_out_fails_before_work(saved_tiny, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = tmp_path / "afile"
            target.write_text("x")
            out = target / "out"
        else:
            out = ro / "out"
        assert compress_tiny(saved_tiny, out) == 2
        assert "--out" in capsys.readouterr().err
    finally:
        os.chmod(ro, 0o700)


def test_existing_out_needs_overwrite(saved_tiny, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert compress_tiny(saved_tiny, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_failed_run_leaves_nothing(saved_tiny, tmp_path, capsys):
    d, _ = saved_tiny
    bad = tmp_path / "short.safetensors"
    from safetensors.torch import save_file

    save_file({"input_ids": torch.zeros(2, 8, dtype=torch.long)}, str(bad))
    out = tmp_path / "o"
    rc = main(["compress", str(d), "--dataset", str(bad), "--seqlen", "32", "--out", str(out), "--no-progress"])
    assert rc == 2 and "seqlen=32" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_unsupported_architecture_cli(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    d = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(d)
    rc = main(["compress", str(d), "--dataset", "c4", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "T5" in capsys.readouterr().err


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "sparsegpt_export", "compress", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--pattern", "--sparsity", "--bits", "--group-size", "--sym", "--asym", "--dataset", "--nsamples",
                 "--seqlen", "--seed", "--device", "--out", "--resume"):
        assert flag in r.stdout, flag


def test_quantizer_quantize_and_resume_flag(saved_tiny, tmp_path):
    from sparsegpt_export import SparseGPTQuantizer

    d, cal = saved_tiny
    q = SparseGPTQuantizer.from_pretrained(str(d), pattern="4:8", bits=None, nsamples=8, seqlen=32, dataset=str(cal))
    out = q.quantize(tmp_path / "q", progress=False)
    assert (out / "model.safetensors").is_file()
    assert not (tmp_path / ".q.sparsegpt-checkpoint").exists()
    assert all(nm_holds(q.model.get_submodule(r["layer"]).weight, 4, 8) for r in q.report["layers"])


def test_explicit_flags_win_over_a_config_file(tmp_path):
    """--config FILE then flags: a flag given wins even when it repeats the default (2:4 over a file's 4:8), a flag
    not given keeps the file's value, and every config field has a flag with the field's default."""
    import argparse
    from dataclasses import fields

    from sparsegpt_export.cli import add_compress_args, config_values

    f = tmp_path / "c.json"
    SparseGPTConfig(pattern="4:8", bits=3, group_size=64, sym=False, damp=0.05).to_json_file(f)
    p = argparse.ArgumentParser()
    add_compress_args(p)
    args = p.parse_args(["m", "--out", "o", "--config", str(f), "--pattern", "2:4", "--group-size", "128", "--sym"])
    cfg = SparseGPTConfig.from_dict(config_values(args))
    assert (cfg.pattern, cfg.group_size, cfg.sym) == ("2:4", 128, True)  # explicit, each equal to the default
    assert (cfg.bits, cfg.damp) == (3, 0.05)  # from the file
    plain = SparseGPTConfig.from_dict(config_values(p.parse_args(["m", "--out", "o"])))
    assert plain == SparseGPTConfig()
    helptext = p.format_help()
    for fl in fields(SparseGPTConfig):
        if fl.metadata.get("cli", True):
            flag = fl.metadata.get("negative") if isinstance(fl.default, bool) and fl.default else None
            assert (flag or fl.metadata.get("flag") or "--" + fl.name.replace("_", "-")) in helptext, fl.name
