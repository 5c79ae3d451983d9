import json

import pytest

from sparsegpt_export.config import ConfigError, SparseGPTConfig, parse_pattern
from sparsegpt_export.quantizer import SparseGPTQuantizer


def test_json_round_trip(tmp_path):
    c = SparseGPTConfig(pattern="4:8", bits=4, group_size=64, sym=False, ignore=["o_proj"], nsamples=16)
    f = tmp_path / "c.json"
    c.to_json_file(f)
    c2 = SparseGPTConfig.from_json_file(f)
    assert c2 == c
    assert SparseGPTConfig.from_dict(json.loads(c.to_json_string())) == c


def test_nm_fixes_sparsity():
    assert SparseGPTConfig(pattern="2:4").sparsity == 0.5
    assert SparseGPTConfig(pattern="1:4").sparsity == 0.75
    assert parse_pattern("unstructured") == (0, 0)


@pytest.mark.parametrize("pattern", ["3:2", "0:4", "4:4", "2-4", "x"])
def test_bad_patterns(pattern):
    with pytest.raises(ConfigError, match="pattern"):
        SparseGPTConfig(pattern=pattern)


@pytest.mark.parametrize("kw,opt", [({"sparsity": 1.0, "pattern": "unstructured"}, "sparsity"),
                                    ({"sparsity": -0.1, "pattern": "unstructured"}, "sparsity"),
                                    ({"bits": 9}, "bits"), ({"bits": 1}, "bits"), ({"group_size": -5}, "group_size"),
                                    ({"damp": 0}, "damp"), ({"ignore": ["("]}, "ignore"), ({"seqlen": 0}, "seqlen")])
def test_bad_values_name_the_option(kw, opt):
    with pytest.raises(ConfigError, match=opt):
        SparseGPTConfig(**kw)


def test_unknown_and_future_keys():
    with pytest.raises(ConfigError, match="unknown"):
        SparseGPTConfig.from_dict({"patern": "2:4"})
    with pytest.raises(ConfigError, match="format_version"):
        SparseGPTConfig.from_dict({"format_version": 99})


def test_quantizer_api_shape():
    from optimum.quantization_base import OptimumQuantizer

    q = SparseGPTQuantizer(pattern="2:4", sparsity=0.5, bits=4, group_size=128, dataset="c4", nsamples=128, seqlen=2048)
    assert isinstance(q, OptimumQuantizer)
    for name in ("quantize_model", "save", "to_dict", "from_dict", "from_pretrained", "quantize"):
        assert callable(getattr(q, name))
    q2 = SparseGPTQuantizer.from_dict(q.to_dict())
    assert q2.config == q.config
    q3 = SparseGPTQuantizer(config=SparseGPTConfig(pattern="4:8", bits=None))
    assert q3.config.pattern == "4:8" and q3.config.bits is None
