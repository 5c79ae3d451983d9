"""Issue #8: --offload disk (the model streamed block by block from its safetensors files) and --max-memory."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sparsegpt_export import SparseGPTQuantizer
from sparsegpt_export.offload import DiskStore, OffloadError, parse_memory

from conftest import compress_tiny


def _weights(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(folder / "model*.safetensors"))):
        out.update(load_file(f))
    return out


def _same_output(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    qa, qb = load_file(str(a / "sparsegpt_quant.safetensors")), load_file(str(b / "sparsegpt_quant.safetensors"))
    assert sorted(qa) == sorted(qb) and all(torch.equal(qa[k], qb[k]) for k in qa)


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    from conftest import save_tiny

    root = tmp_path_factory.mktemp("offload")
    saved = save_tiny(root)
    assert compress_tiny(saved, root / "mem") == 0
    return root, saved


def test_disk_offload_gives_the_in_memory_checkpoint(in_memory, tmp_path):
    root, saved = in_memory
    out = tmp_path / "disk"
    assert compress_tiny(saved, out, "--offload", "disk") == 0
    _same_output(root / "mem", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per block (2) and one for the rest
    assert json.loads((out / "sparsegpt_report.json").read_text())["offload"] == "disk"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, _weights(root / "mem")["model.layers.1.mlp.down_proj.weight"])
    assert not (tmp_path / ".disk.sparsegpt-checkpoint").exists()


def test_disk_offload_holds_one_block_at_a_time(in_memory, tmp_path, monkeypatch):
    root, (d, cal) = in_memory
    seen = []
    fetch = DiskStore.fetch

    def spy(self, bi, block, device):
        layers = self.model.model.layers
        seen.append([all(p.device.type == "meta" for p in b.parameters()) for b in layers])
        fetch(self, bi, block, device)

    monkeypatch.setattr(DiskStore, "fetch", spy)
    q = SparseGPTQuantizer.from_pretrained(str(d), offload="disk", pattern="2:4", bits=4, group_size=32, nsamples=8,
                                           seqlen=32, device="cpu")
    q.dataset = str(cal)
    assert all(p.device.type == "meta" for p in q.model.parameters())  # nothing loaded up front
    q.quantize(tmp_path / "out", progress=False)
    assert seen == [[True, True], [True, True]]  # every other block was on meta when a block came in
    assert all(p.device.type == "meta" for p in q.model.model.layers.parameters())
    _same_output(root / "mem", tmp_path / "out")


def test_disk_offload_crash_and_resume(in_memory, tmp_path):
    root, (d, cal) = in_memory
    stage = tmp_path / "stage"
    args = [sys.executable, "-m", "sparsegpt_export", "compress", str(d), "--dataset", str(cal), "--nsamples", "8",
            "--seqlen", "32", "--group-size", "32", "--device", "cpu", "--no-progress", "--offload", "disk",
            "--offload-dir", str(stage), "--out", str(tmp_path / "out")]
    env = {**os.environ, "SPARSEGPT_EXPORT_CRASH_AFTER_BLOCK": "0"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 75, r.stderr
    assert not (tmp_path / "out").exists()
    assert (stage / "out.sparsegpt-checkpoint" / "block_00000.safetensors").is_file()
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _same_output(root / "mem", tmp_path / "out")


def test_offload_bad_input(in_memory, tmp_path, capsys):
    root, saved = in_memory
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert compress_tiny(saved, tmp_path / "o1", "--offload", "disk", "--offload-dir", str(blocker / "sub")) == 2
    assert "--offload-dir" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert compress_tiny(saved, tmp_path / "o2", "--max-memory", "lots") == 2
    assert "--max-memory: 'lots'" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((saved[0] / "config.json").read_text())
    with pytest.raises(OffloadError, match="has no model.safetensors"):
        q = SparseGPTQuantizer.from_pretrained(str(bare), offload="disk", nsamples=8, seqlen=32)
        q.dataset = str(saved[1])
        q.quantize(tmp_path / "o3", progress=False)
    assert not (tmp_path / "o3").exists()


def test_max_memory_keeps_activations_in_host_memory(in_memory, tmp_path):
    root, saved = in_memory
    out = tmp_path / "spill"
    assert compress_tiny(saved, out, "--max-memory", "1KB") == 0
    rep = json.loads((out / "sparsegpt_report.json").read_text())
    assert rep["activations"] == "host"
    assert json.loads((root / "mem" / "sparsegpt_report.json").read_text())["activations"] == "device"
    _same_output(root / "mem", out)


def test_parse_memory():
    assert parse_memory("20GiB") == 20 << 30 and parse_memory("512MB") == 512 * 10 ** 6 and parse_memory("4096") == 4096
    assert parse_memory("1.5gb") == 1_500_000_000
    for bad in ("-1GB", "x", "0"):
        with pytest.raises(OffloadError):
            parse_memory(bad)


def test_disk_offload_chunks_windows_to_about_one_block(in_memory, tmp_path, monkeypatch):
    """Streaming from disk on CPU, a chunk's block-forward activations are budgeted at one block's bytes (not 35% of
    free memory): with a per-window estimate of just over a third of a block, the 8 windows go 2 at a time, and the in-memory
    run given 2 per forward writes the same checkpoint."""
    import sparsegpt_export.pipeline.loop as loop
    from sparsegpt_export.anatomy import find_blocks

    root, saved = in_memory
    real = loop.auto_batch_size
    seen = {}

    def fake(model, nsamples, seqlen, device, budget=None):
        if budget is None:
            return real(model, nsamples, seqlen, device)
        block = sum(p.numel() for p in find_blocks(model)[1][0].parameters()) * 4
        seen["budget"], seen["block"] = budget, block
        return max(1, min(nsamples, int(budget // (block / 3 + 1))))

    monkeypatch.setattr(loop, "auto_batch_size", fake)
    assert compress_tiny(saved, tmp_path / "disk", "--offload", "disk") == 0
    assert seen["budget"] == seen["block"]
    report = json.loads((tmp_path / "disk" / "sparsegpt_report.json").read_text())
    assert report["calib_batch_size"] == 2  # block / (block/3 + 1) rounds down to 2
    assert compress_tiny(saved, tmp_path / "mem2", "--calib-batch-size", "2") == 0
    _same_output(tmp_path / "mem2", tmp_path / "disk")


def test_disk_offload_pins_host_memory_before_building_anything(in_memory, monkeypatch):
    """glibc's mmap threshold is pinned before the skeleton is built (pinned later, the heap grew block after
    block); the in-memory path leaves it alone."""
    import sparsegpt_export.hostmem as hostmem
    import sparsegpt_export.offload as offload

    _, (model_dir, _) = in_memory
    calls: list[str] = []
    monkeypatch.setattr(hostmem, "returns_memory", lambda: calls.append("pin"))
    real = offload.load_skeleton
    monkeypatch.setattr(offload, "load_skeleton", lambda *a, **k: (calls.append("skeleton"), real(*a, **k))[1])
    SparseGPTQuantizer.from_pretrained(str(model_dir), pattern="2:4", bits=None, offload="disk")
    assert calls[:2] == ["pin", "skeleton"]
    calls.clear()
    SparseGPTQuantizer.from_pretrained(str(model_dir), pattern="2:4", bits=None, offload="cpu")
    assert "pin" not in calls


def test_out_of_memory_is_one_clear_error_and_resumes(in_memory, tmp_path, monkeypatch, capsys):
    """A process (a rank under torchrun) that runs out of memory in the middle of the run: exit code 1, a message
    naming the rank and what to lower, nothing at --out, and --resume finishes with the in-memory result."""
    import sparsegpt_export.solver.update as update

    root, saved = in_memory
    real, calls = update.sparsegpt_solve, []

    def solve(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # inside the second block
            raise MemoryError()
        return real(*a, **k)

    monkeypatch.setattr(update, "sparsegpt_solve", solve)
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    assert compress_tiny(saved, out) == 1
    err = capsys.readouterr().err
    assert "out of memory on rank 1" in err and "--resume" in err and "--calib-batch-size" in err
    assert not out.exists()
    monkeypatch.setattr(update, "sparsegpt_solve", real)
    monkeypatch.delenv("RANK")
    assert compress_tiny(saved, out, "--resume") == 0
    _same_output(root / "mem", out)


def test_auto_batch_size_reads_per_layer_sizes():
    """Gemma 3n lists one intermediate size per layer: the largest one sizes the batch (it was a TypeError)."""
    from types import SimpleNamespace

    from sparsegpt_export.pipeline.state import auto_batch_size

    def model(**cfg):
        return SimpleNamespace(config=SimpleNamespace(**cfg))

    per_sample = 64 * (8 * 32 + 4 * 256) * 4 + 4 * 64 * 64 * 4  # seqlen 64, hidden 32, the largest size 256, 4 heads
    budget = 10 * per_sample + 1
    got = auto_batch_size(model(hidden_size=32, intermediate_size=[128, 256], num_attention_heads=4), 100, 64,
                          torch.device("cpu"), budget=budget)
    assert got == 10
    assert auto_batch_size(model(hidden_size=32, intermediate_size=256, num_attention_heads=4), 100, 64,
                           torch.device("cpu"), budget=budget) == 10
