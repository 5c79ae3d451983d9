"""The coverage sweep's fast subset: a few families end to end, a refusal, and a crash that does not stop the sweep."""
import json

from benchmarks import coverage


def test_fast_subset_of_the_sweep(tmp_path):
    types = ["llama", "mixtral", "gpt_oss", "bloom", "cpmant", "mamba", "reformer"]
    assert coverage.main(["--only", ",".join(types), "--out", str(tmp_path), "--timeout", "240"]) == 0
    data = json.loads((tmp_path / "coverage.json").read_text())
    import transformers

    assert data["transformers"] == transformers.__version__
    rows = {r["model_type"]: r for r in data["rows"]}
    assert list(rows) == types
    for mt in ("llama", "mixtral", "gpt_oss", "bloom", "cpmant"):
        r = rows[mt]
        assert r["status"] == "works", r
        assert r["layers_compressed"] == r["linear_layers_found"] > 0, r
        assert r["logits_rel_max_diff"] <= 1e-4
    assert rows["mixtral"]["layers_compressed"] == 2 * (4 + 2 * 4)  # q, k, v, o + every expert's two matrices
    assert rows["mixtral"]["experts"] > 0
    for mt in ("mamba", "reformer"):
        assert rows[mt]["status"] == "refused" and rows[mt]["reason"].startswith(f"model type '{mt}'")
    assert data["totals"] == {"model_types": 7, "works": 5, "refused": 2, "failed": 0, "skipped": 0,
                              "works_share_of_compressible": 1.0}
    md = (tmp_path / "coverage.md").read_text()
    assert f"transformers {transformers.__version__}" in md and "| mixtral |" in md


def test_a_crashing_family_does_not_stop_the_sweep(monkeypatch):
    monkeypatch.setenv(coverage.CRASH_ENV, "gpt2")
    rows = coverage.sweep(["gpt2", "llama"], timeout=240, log=lambda *a, **k: None)
    assert rows[0]["status"] == "failed" and rows[0]["stage"] == "crash" and "exit code 3" in rows[0]["error"]
    assert rows[1]["status"] == "works"


def test_families_that_needed_the_pipeline_to_bend(tmp_path):
    """Kolibri's blocks return (hidden states, index pool); Zaya calls v_proj_delayed twice per forward (the second
    time on zeros); DeepSeek-V4's o_a_proj is an nn.Linear subclass with a grouped forward (the loader keeps that
    module, with the decoded weight); Gemma 4's assistant cannot run without its target model's keys and values."""
    import pytest

    wanted = {"kolibri1_1": "works", "zaya": "works", "deepseek_v4": "works", "gemma4_assistant": "refused"}
    types = [t for t in wanted if t in coverage.causal_lm_types()]
    if not types:
        pytest.skip("none of these model types in this transformers")
    assert coverage.main(["--only", ",".join(types), "--out", str(tmp_path), "--timeout", "240"]) == 0
    rows = {r["model_type"]: r for r in json.loads((tmp_path / "coverage.json").read_text())["rows"]}
    for mt in types:
        assert rows[mt]["status"] == wanted[mt], rows[mt]
        if wanted[mt] == "works":
            assert rows[mt]["layers_compressed"] > 0 and rows[mt]["logits_rel_max_diff"] <= 1e-4, rows[mt]
    if "gemma4_assistant" in rows:
        assert "assistant (draft) model" in rows["gemma4_assistant"]["reason"]
