"""The benchmark harness itself: ``python -m benchmarks run --suite all --quick`` on CPU, and its JSON."""
import json
import math
import sys
import pytest

from benchmarks.__main__ import main
from benchmarks.harness import check_measured, device_name
from benchmarks.suites import ceilings


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_measured_results(tmp_path, capsys):
    assert main(["run", "--suite", "all", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    folder = tmp_path / device_name("cpu")
    res = {}
    for suite in ("gemm", "e2e", "compress"):
        res[suite] = json.loads((folder / f"{suite}.json").read_text())
        assert (folder / f"{suite}.md").read_text().startswith(suite)
        assert res[suite]["suite"] == suite and res[suite]["env"]["device"] == "cpu" and res[suite]["rows"]
        check_measured(res[suite])  # no NaN, no missing figure
    for r in res["gemm"]["rows"]:
        t = r["dense"]
        assert _positive(t["median_ms"]) and t["min_ms"] <= t["median_ms"] <= t["max_ms"]
        assert "CUDA" in r["sparse"]["skipped"]  # never a made-up GPU figure
    (e2e,) = res["e2e"]["rows"]
    assert e2e["sparse24"]["layers_dense"] == 14 and e2e["sparse24"]["layers_on_kernels"] == 0
    for k, v in e2e["speedup"].items():
        assert _positive(v), k
        assert _positive(e2e["dense"][k]["median_ms"]) and _positive(e2e["sparse24"][k]["median_ms"])
    ours = [r for r in res["compress"]["rows"] if r["tool"] == "sparsegpt-export"]
    assert len(ours) == 2 and all(_positive(r["wall_s"]) and _positive(r["peak_rss_mb_process"]) for r in ours)
    for r in ours:  # each output checked by the same code as the peer's: an exact 2:4 mask, half zeros or more
        assert r["nm_violating_groups"] == 0 and r["zero_fraction"] >= 0.5 and _positive(r["ppl"])
        assert r["head_zero_fraction"] < 0.01  # the embedding / output projection is never pruned
    peer = [r for r in res["compress"]["rows"] if r["tool"] == "llmcompressor"]
    assert peer and all("not set up" in r["skipped"] for r in peer)  # --quick never picks a peer up by itself
    # the tables are printed last, with the ceilings
    assert printed.rstrip().endswith("|") and "decode ceiling" in printed


def test_ceilings_and_the_no_placeholder_check():
    c = {r["format"].split(" (")[0].split(" +")[0]: r["bytes_per_weight"] for r in ceilings()["formats"]}
    assert c["fp16 dense"] == 2.0 and c["fp16 2:4"] == 1.125 and c["int4 2:4"] == pytest.approx(0.3906, abs=1e-4)
    with pytest.raises(ValueError, match=r"rows\[0\].median_ms is nan"):
        check_measured({"rows": [{"median_ms": float("nan")}]})
    with pytest.raises(ValueError, match="missing"):
        check_measured({"rows": [{"median_ms": None}]})


def test_cuda_requested_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", "--suite", "gemm", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_compress_suite_reports_a_failing_peer():
    """The peer script run under a Python without llmcompressor: each peer row records the failure, ours still
    carry their figures, and the JSON passes the no-placeholder check."""
    from benchmarks import suites

    res = suites.run_compress("cpu", True, peer_python=sys.executable)
    check_measured(res)
    assert res["peer"]["python"] == sys.executable
    peer = [r for r in res["rows"] if r["tool"] == "llmcompressor"]
    assert len(peer) == 3 and all("llmcompressor failed: ModuleNotFoundError" in r["skipped"] for r in peer)
    assert all(_positive(r["wall_s"]) for r in peer)
    assert "skipped: llmcompressor failed" in "\n".join(suites.compress_table(res))


def test_gpu_check_quick_on_cpu(tmp_path, capsys):
    """``python -m benchmarks gpu-check --quick`` on CPU: the tests step, gemm and e2e rows, the files and raw logs;
    every packed layer checked against dense before it is timed, nothing made up for the GPU-only rows."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu-check --quick would run on it")
    assert main(["gpu-check", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    folder = tmp_path / device_name("cpu")
    res = json.loads((folder / "gpu_check.json").read_text())
    check_measured(res)
    assert (folder / "gpu_check.md").read_text().startswith("gpu-check on")
    assert "tests/test_cuda.py" in (folder / "gpu_check_tests.log").read_text()
    assert "== e2e" in (folder / "gpu_check.log").read_text()
    assert res["tests"]["rc"] == 0 and "skipped" in res["tests"]["summary"]
    (crow,) = res["compress"]  # the tiny model compressed whole: 2 blocks x 7 layers, timed, with its profile
    assert crow["layers"] == 14 and _positive(crow["compress_s"]) and 0 < crow["mean_rel_error"] < 1
    assert _positive(crow["profile"]["solve_s"]) and "estimate_8B" not in crow
    assert "compress on" in (folder / "gpu_check.md").read_text()
    for r in res["gemm"]["rows"]:
        for v in ("fp16 2:4", "int4 2:4", "int4 dense (tinygemm)"):  # each checked against dense, then timed
            assert r[v]["rel_error"] < 2e-2 and _positive(r[v]["eager"]["median_ms"]), (v, r[v])
        assert r["int4 2:4"]["kernel"] == "int4_24" and r["fp16 2:4"]["kernel"] == "fp16_24"
        assert "graph" not in r["dense"]  # no CUDA graph on a CPU
    (row,) = res["e2e"]
    for v in ("int4 2:4", "fp16 2:4", "dense", "int4 dense (tinygemm)"):
        assert _positive(row[v]["decode_b1_eager"]["tokens_per_s"]) and _positive(row[v]["prefill_1x64"]["median_ms"])
        assert "needs CUDA" in row[v]["decode_b1_compiled"]["skipped"]
    # int4 2:4 linears hold less than a third of the fp16 bytes (codes + positions + scales)
    assert row["int4 2:4"]["linear_weights_gib"] < 0.33 * row["dense"]["linear_weights_gib"]
    assert printed.rstrip().endswith("raw logs)") and "| int4 2:4 |" in printed


def test_gpu_check_runs_without_the_libraries_the_gpu_machine_lacks(tmp_path):
    """The lent GPU machine has torch, triton, transformers, accelerate and onnx, but no optimum, datasets,
    compressed-tensors or gguf: the package and the whole ``gpu-check`` (here ``--quick``, on CPU) run without them."""
    import os
    import subprocess
    from pathlib import Path

    code = ("import sys\n"
            "for m in ('optimum', 'datasets', 'compressed_tensors', 'gguf'): sys.modules[m] = None\n"
            "import sparsegpt_export, sparsegpt_export.cli, sparsegpt_export.quantizer\n"
            "from benchmarks.__main__ import main\n"
            f"sys.exit(main(['gpu-check', '--quick', '--out', {str(tmp_path)!r}]))\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root)] + sys.path)})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / device_name("cpu") / "gpu_check.json").read_text())
    assert res["quick"] and res["compress"] and res["gemm"] and res["e2e"]


def test_gpu_check_keeps_a_run_with_a_failed_build_or_a_nan(tmp_path, monkeypatch, capsys):
    """A GPU window is run once: a model that fails to build is a skipped row, a NaN layer output is not timed, and
    a figure that is not finite (here the compress row's error) still leaves everything on disk, marked invalid."""
    import torch

    from benchmarks import compress_row, serving

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu-check --quick would run on it")
    x = torch.ones(2, 8)
    cell = serving._cell(lambda t: t * float("nan"), x, x, "cpu", {"kernel": "k"}, 1.0)
    assert "relative error nan" in cell["skipped"] and "eager" not in cell

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    real = compress_row.compress_row
    monkeypatch.setattr(serving, "build_llama", oom)
    monkeypatch.setattr(compress_row, "compress_row", lambda *a: {**real(*a), "mean_rel_error": float("nan")})
    assert main(["gpu-check", "--quick", "--out", str(tmp_path)]) == 1
    folder = tmp_path / device_name("cpu")
    assert not (folder / "gpu_check.json").exists()  # nothing that looks checked
    res = json.loads((folder / "gpu_check.unchecked.json").read_text())
    assert "mean_rel_error is nan" in res["invalid"]
    assert "OutOfMemoryError" in res["e2e"][0]["skipped"] and res["gemm"]["rows"]
    assert "INVALID" in (folder / "gpu_check.md").read_text() and "INVALID" in capsys.readouterr().out


def test_gpu_check_tests_step_cut_at_its_limit(tmp_path):
    """The tests step of gpu-check is cut at its share of the budget: what pytest printed so far is kept, as text."""
    from benchmarks.gpu_check import run_tests

    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\ndef test_a():\n    print('started', flush=True)\n    time.sleep(60)\n")
    res = run_tests([str(slow), "-s"], 1.0, tmp_path / "tests.log")
    log = (tmp_path / "tests.log").read_text()
    assert res["rc"] == -1 and res["summary"] == "(cut at 5 s)"  # 5 s at the least
    assert "started" in log and "(cut at 5 s)" in log and "b'" not in log and "\\n" not in log


def test_gpu_check_needs_a_gpu_without_quick(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["gpu-check"]) == 2
    assert "--quick" in capsys.readouterr().err


def test_compress_estimate_scales_each_part_by_its_work():
    """gpu-check's ~8B ESTIMATE: a model estimated from itself gives its own forwards + Hessians + solves; a model
    with twice the blocks and the same shapes twice that; wider layers scale the solve by rows x cols^2."""
    from benchmarks.compress_row import estimate
    from benchmarks.suites import E2E_MODELS

    small = E2E_MODELS["tiny"]
    measured = {"profile": {"block_forward_s": 2.0, "hessian_s": 1.0, "solve_s": 3.0, "checkpoint_s": 9.0}}
    assert estimate(measured, small, small)["compress_s"] == pytest.approx(6.0)
    assert estimate(measured, small, {**small, "num_hidden_layers": 4})["compress_s"] == pytest.approx(12.0)
    wide = estimate(measured, small, {**small, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
                                      "num_key_value_heads": 4})
    assert wide["ESTIMATE"] and wide["weights_ratio"] == pytest.approx(4.0) and wide["solve_ratio"] == pytest.approx(8.0)
    assert wide["compress_s"] == pytest.approx(2 * (2.0 * 4 + 1.0 * 4 + 3.0 * 8) / 2)
