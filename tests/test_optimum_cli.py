"""``optimum-cli sparsegpt ...``: the plugin file in optimum-cli's PEP 420 namespace runs our commands."""
import subprocess
import sys

from safetensors.torch import load_file

from sparsegpt_export.cli import main


def _optimum_cli(*args):
    code = "import sys; from optimum.commands.optimum_cli import main; sys.argv = ['optimum-cli', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


def test_help_lists_the_commands():
    r = _optimum_cli("sparsegpt", "--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("compress", "export", "eval", "run"):
        assert cmd in r.stdout
    r = _optimum_cli("sparsegpt", "export", "--help")
    assert r.returncode == 0 and "--format" in r.stdout and "compressed-tensors" in r.stdout, r.stdout + r.stderr


def test_compress_and_export_through_optimum_cli(saved_tiny, tmp_path):
    d, cal = saved_tiny
    comp, out = tmp_path / "c", tmp_path / "dense"
    r = _optimum_cli("sparsegpt", "compress", str(d), "--pattern", "2:4", "--bits", "4", "--group-size", "32",
                     "--dataset", str(cal), "--nsamples", "8", "--seqlen", "32", "--out", str(comp), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _optimum_cli("sparsegpt", "export", str(comp), "--format", "dense", "--out", str(out))
    assert r.returncode == 0 and "exported" in r.stdout, r.stderr
    # the same as the plain CLI
    assert main(["export", str(comp), "--format", "dense", "--out", str(tmp_path / "dense2")]) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "dense2" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    r = _optimum_cli("sparsegpt", "export", str(comp), "--format", "bogus", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "bogus" in r.stderr
