"""`SparseGPTConfig`: the one validated description of a compression run.

It round-trips through JSON (`to_dict` / `from_dict` / `to_json_file` / `from_json_file`) and is written
beside every checkpoint as `sparsegpt_config.json`.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """An option of `SparseGPTConfig` is out of range; the message names the option."""


_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """`"2:4"` -> `(2, 4)`: at most N nonzeros in every M consecutive input weights; `(0, 0)` for unstructured."""
    if pattern in ("unstructured", "dense"):
        return (0, 0)
    m = _PATTERN_RE.match(str(pattern))
    if not m:
        raise ConfigError(
            f"pattern: {pattern!r} is not 'unstructured', 'dense' or 'N:M' (e.g. '2:4', '4:8')"
        )
    n, mm = int(m.group(1)), int(m.group(2))
    if not (0 < n < mm):
        raise ConfigError(
            f"pattern: {pattern!r} must keep N nonzeros out of every M with 0 < N < M (N:M counts the kept "
            "weights, as NVIDIA's 2:4 does)"
        )
    return n, mm


QUANT_ORDERS = ("after-mask", "joint")
ALLOCATIONS = ("uniform", "sensitivity", "owl")
METHODS = ("hutchinson", "fisher", "obd", "proxy")
SALIENCIES = ("obs", "isc")
UPDATES = ("auto", "obs", "admm")
ADMM_MASKS = ("gradual", "obs")
SWEEPS = ("auto", "torch", "triton")  # solver.obs.SWEEPS
REFINE_STEPS = 24  # ADMM iterations (benchmarks/results/best_quality.md)
RECONSTRUCT_LR = 3e-3  # relative step size of the reconstruction (same file)
SMOOTH_AUTO = 0.6  # smooth_alpha "auto" with bits (benchmarks/results/onnx_smoothing.md, best_quality.md)
MIXED = "mixed sparsity and the weight update"


def _opt(default: Any, help: str, *, flag: Optional[str] = None, negative: Optional[str] = None,
         choices: Optional[tuple] = None, group: Optional[str] = None, parse: Optional[str] = None,
         metavar: Optional[str] = None, cli: bool = True) -> Any:
    """A config field with what the command line needs of it (``sparsegpt_export.cli`` builds its flags from these):
    ``flag`` (default ``--the-name``), ``negative`` (the flag that sets a boolean False), ``choices`` (also checked by
    ``validate``), ``group`` (a help section), ``parse`` (a named value parser), ``cli=False`` for no flag."""
    meta = {"help": help, "flag": flag, "negative": negative, "choices": choices, "group": group, "parse": parse,
            "metavar": metavar, "cli": cli}
    if default is list:
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SparseGPTConfig:
    """Everything that decides the compressed weights.

    pattern: ``"2:4"``, ``"4:8"``, any ``"N:M"`` (N kept of every M consecutive input weights),
        ``"unstructured"`` (at ``sparsity``) or ``"dense"`` (no pruning: quantization only, GPTQ-style).
    sparsity: fraction of weights removed for ``unstructured``; fixed to ``1 - N/M`` for N:M.
    bits: 2..8 for joint quantization of the kept weights, or ``None`` for no quantization.
    group_size: quantization group along the input dimension (e.g. 32/64/128), or ``None``/``-1`` per channel.
    sym: symmetric grid (codes ``0..2^b-1`` around the fixed zero point ``2^(b-1)``) or asymmetric.
    stack_shared_inputs: layers that share one input and are solved row by row alike (q/k/v, gate/up under N:M or
        quantization alone) are solved in one sweep over their stacked rows: the same algorithm per row, fewer column
        steps (faster on the CPU, where the sweep's per-column work dominates).
    quantize_lm_head: also quantize the output projection to ``bits`` with the same solver (never pruned; its
        calibration inputs are the final norm's outputs). A tied lm_head is untied: the embedding stays float.
    allocation: per-matrix sparsity for ``unstructured``: ``uniform``, ``sensitivity`` (density linear in the
        sensitivity rank between ``1-p-alpha`` and ``1-p+alpha``) or ``owl`` (outlier ratio per block, +-
        ``owl_lambda``, threshold ``owl_m`` x mean); the parameter-weighted average stays ``sparsity``.
    sensitivity: the score: ``obd`` (default: the mean OBD saliency F_ii w_i^2 of the matrix's weights, squared
        gradients over ``probes`` windows), ``hutchinson`` (loss-Hessian trace, ``probes`` Rademacher probes),
        ``fisher`` (squared gradients alone) or ``proxy`` (trace of the layer Hessian x ||W||^2, no backward). On
        SmolLM2-135M at 70% ``obd`` gave 35% lower WikiText-2 perplexity than uniform, ``hutchinson`` 50% higher
        (``benchmarks/results/accuracy_smollm2.md``).
    sensitivity_cache: JSON file for the scores (reused when model, method, probes, seed and data match).
    dense_fraction: N:M only: the most sensitive fraction of the matrices stays dense (quantized when bits is set).
    mix_pattern, mix_fraction: N:M only: the most sensitive ``mix_fraction`` of the others get ``mix_pattern``
        (e.g. ``4:8`` beside ``2:4``).
    saliency: which weights to drop: ``obs`` (SparseGPT, w^2/[H^-1]^2) or ``isc`` (Shao et al., w^2 ([H] + 1/[H^-1])).
    update: ``auto`` (default: ``admm`` for N:M patterns, ``obs`` for unstructured), ``obs`` (SparseGPT's sweep) or
        ``admm`` (least squares on the mask by ADMM, ``refine_steps`` iterations; ``admm_mask``: ``gradual`` chooses
        the mask during the first 3/4 of them, ``obs`` keeps the sweep's mask and starts from its weights).
        Quantization then runs on the final weights with the mask fixed.
    smooth_alpha: the migration strength in (0, 1] of activation smoothing before each block is compressed
        (SmoothQuant: input channel c divided by rms_c^alpha / max|W_c|^(1-alpha) where the input is made, the weight
        column multiplied by it; `sparsegpt_export.smoothing`), 0 for none, or None (default, "auto"): `SMOOTH_AUTO`
        when ``bits`` are set and every block has the Llama-style norm -> q/k/v and norm -> gate/up pairs, else none.
        It matters for graphs that quantize activations at run time (ONNX Runtime's MatMulNBits at accuracy_level 4,
        which the ONNX export then picks): under the OBS update on SmolLM2-135M 2:4 + 4-bit g128, 0.6 brought the
        level-4 logits error from 3.82e-2 to 1.75e-2, and perplexity from 92.42 to 92.04 (WikiText-2) and 146.54 to
        129.57 (C4) (``benchmarks/results/onnx_smoothing.md``).
    smooth_lm_head_alpha: with ``quantize_lm_head``, the migration strength for the final norm -> lm_head pair;
        None (default) takes half of ``smooth_alpha``, 0 leaves that pair unsmoothed. The lm_head's weights take
        smoothing worse than the blocks': on SmolLM2 with smooth_alpha 0.6, head strengths 0 / 0.3 / 0.45 / 0.6 gave
        WikiText-2 perplexity 94.75 / 94.97 / 98.98 / 109.34 and level-4 logits error 2.09e-2 / 1.89e-2 / 1.89e-2 /
        1.86e-2 (``benchmarks/results/onnx_smoothing_lmhead.md``).
    quant_order: with ``bits`` and pruning under the ``obs`` update: ``after-mask`` (default) runs SparseGPT's sweep
        without quantization to choose the mask and update the weights, then a second sweep quantizes the kept
        weights on that fixed mask, spreading each rounding error over the columns not yet done (GPTQ on the
        mask); ``joint`` chooses the mask and quantizes in one sweep (the mask choice then sees the grid). On
        SmolLM2 2:4 + 4-bit g128 sym: after-mask 4.44x dense WikiText-2 perplexity, joint 5.33x, for about the
        same time (``benchmarks/results/compress_smollm2.md``).
    """

    pattern: str = _opt("2:4", "2:4, 4:8, any N:M (N kept of M), unstructured, or dense (default 2:4)")
    sparsity: float = _opt(0.5, "unstructured sparsity (default 0.5)")
    bits: Optional[int] = _opt(4, "joint quantization bits 2..8, or 'none' (default 4)", parse="bits")
    group_size: Optional[int] = _opt(128, "quantization group size, or -1 per channel (default 128)", parse="group")
    sym: bool = _opt(True, "symmetric grid (default); --asym: asymmetric grid (zero point per group)", flag="--sym",
                     negative="--asym")
    damp: float = _opt(0.01, "Hessian damping, fraction of mean(diag H) (default 0.01)")
    blocksize: int = _opt(128, "lazy-update block size B (default 128)")
    mask_blocksize: int = _opt(128, "adaptive mask block Bs, unstructured (default 128)")
    hessian_dtype: str = _opt("float32", "dtype of the layer Hessians", choices=("float32", "float64"))
    fit_scales_to_kept: bool = _opt(True, "fit each group's grid to all its weights instead of only the kept ones",
                                    negative="--no-fit-scales")
    clip_search: bool = _opt(True, "plain min/max grid, no clipping search", negative="--no-clip-search")
    refit_scales: bool = _opt(True, "keep the scales chosen during the sweep instead of refitting them to the final "
                                    "codes", negative="--no-refit-scales")
    stack_shared_inputs: bool = _opt(True, "solve q/k/v and gate/up one layer at a time instead of in one sweep over "
                                           "their stacked rows", negative="--no-stack-shared-inputs")
    quantize_lm_head: bool = _opt(False, "also quantize the lm_head to --bits (not pruned; a tied one is untied from "
                                         "the embedding)", flag="--quantize-lm-head")
    allocation: str = _opt("uniform", "per-matrix sparsity for unstructured pruning; the parameter-weighted average "
                                      "stays --sparsity", choices=ALLOCATIONS, group=MIXED)
    sensitivity: str = _opt("obd", "sensitivity score: mean OBD saliency F_ii w_i^2 of the matrix (obd, default), "
                                   "loss-Hessian trace by Hutchinson probes, squared gradients (fisher), or "
                                   "trace(H_layer) x ||W||^2 (proxy, no backward)", choices=METHODS, group=MIXED)
    probes: int = _opt(32, "Hutchinson probes / Fisher and OBD windows (default 32)", group=MIXED)
    alpha: float = _opt(0.1, "sensitivity allocation: density 1-p +- alpha (default 0.1)", group=MIXED)
    owl_lambda: float = _opt(0.08, "OWL: sparsity spread +- lambda (default 0.08)", group=MIXED)
    owl_m: float = _opt(5.0, "OWL: outlier threshold, x the block mean (default 5)", group=MIXED)
    sensitivity_cache: Optional[str] = _opt(None, "JSON file for the scores (default: sparsegpt-sensitivity.json "
                                                  "beside --out)", group=MIXED)
    dense_fraction: float = _opt(0.0, "N:M: keep the most sensitive fraction of the linear layers dense (e.g. 0.1)",
                                 group=MIXED)
    mix_pattern: Optional[str] = _opt(None, "N:M: a second pattern for the most sensitive layers (e.g. 4:8)",
                                      group=MIXED)
    mix_fraction: float = _opt(0.0, "N:M: fraction of the layers that get --mix-pattern", group=MIXED)
    saliency: str = _opt("obs", "which weights to drop: SparseGPT's w^2/[H^-1]^2 (obs) or Shao et al.'s isc",
                         choices=SALIENCIES, group=MIXED)
    update: str = _opt("auto", "weight update: least squares on the mask by ADMM (admm), SparseGPT's sweep (obs), "
                               "or auto (default: admm for N:M patterns, obs for unstructured)",
                       choices=UPDATES, group=MIXED)
    refine_steps: int = _opt(REFINE_STEPS, f"ADMM iterations (default {REFINE_STEPS})", group=MIXED)
    admm_mask: str = _opt("gradual", "ADMM: choose the mask gradually during the iterations (default) or keep the "
                                     "sweep's", choices=ADMM_MASKS, group=MIXED)
    sweep: str = _opt("auto", "the column sweep's lazy blocks: one Triton kernel per block (triton: CUDA), torch's "
                              "per-column steps (torch), or auto (default: the kernel on a CUDA device when triton is "
                              "installed, else torch)", choices=SWEEPS, group=MIXED)
    reconstruct_steps: int = _opt(0, "after each block's layers are compressed, tune its kept weights (with --bits, its "
                                     "group scales) for N Adam steps so that its outputs match the dense block's "
                                     "(default 0: off)", metavar="N", group=MIXED)
    reconstruct_lr: float = _opt(RECONSTRUCT_LR, f"reconstruction step size, relative to each layer's mean |weight| "
                                                 f"or to its scales (default {RECONSTRUCT_LR:g})", group=MIXED)
    reconstruct_batch: int = _opt(4, "calibration windows per reconstruction step (default 4)", group=MIXED)
    quant_order: str = _opt("after-mask", "with --bits and pruning: choose the mask first, then quantize on it in a "
                                          "second sweep (after-mask, default), or mask and quantize in one sweep "
                                          "(joint)", choices=QUANT_ORDERS)
    smooth_alpha: Optional[float] = _opt(
        None, f"activation smoothing before compression, migration strength in (0, 1], 0 (off) or auto (default: "
              f"{SMOOTH_AUTO:g} with --bits when every block has the Llama-style norm -> q/k/v and norm -> gate/up "
              f"pairs, else off); for graphs that quantize activations, e.g. ONNX at accuracy_level 4",
        metavar="ALPHA", parse="alpha")
    smooth_lm_head_alpha: Optional[float] = _opt(
        None, "with --quantize-lm-head: migration strength for the final norm -> lm_head pair (default: half of "
              "--smooth-alpha, 0.3 measured best on SmolLM2 for 0.6; 0: that pair unsmoothed)", metavar="ALPHA",
        parse="float")
    scale_dtype: Optional[str] = _opt(None, "dtype the quantization scales are stored in (default: the model's "
                                            "float16/bfloat16, else float16)", choices=("float16", "bfloat16", "float32"))
    targets: list[str] = _opt(list, "regex of module names to compress (repeatable)")
    ignore: list[str] = _opt(list, "regex of module names to leave alone (repeatable)")
    on_incompatible: str = _opt("skip", "a layer whose columns are not a multiple of M: skip it with a warning "
                                        "(default) or fail", choices=("skip", "error"))
    dataset: Optional[str] = _opt("c4", "c4, wikitext2, ptb, or a .txt/.jsonl/.parquet/.safetensors file")
    nsamples: int = _opt(128, "calibration windows (default 128)")
    seqlen: int = _opt(2048, "tokens per calibration window (default 2048)")
    seed: int = _opt(0, "seed of the calibration windows and the sensitivity probes (default 0)")
    calib_batch_size: Optional[int] = _opt(None, "windows per block forward (default: all that fit)", parse="int")
    device: Optional[str] = _opt(None, "cpu or cuda (default: cuda when available)")
    format_version: int = _opt(1, "", cli=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def resolved_smooth_alpha(self, smoothable: bool) -> float:
        """The blocks' migration strength: ``smooth_alpha``, or for ``None`` (auto) `SMOOTH_AUTO` when ``bits`` are
        set and ``smoothable`` (every block has both Llama-style norm pairs, `smoothing.smoothable`), else 0."""
        if self.smooth_alpha is not None:
            return float(self.smooth_alpha)
        return SMOOTH_AUTO if self.bits is not None and smoothable else 0.0

    def lm_head_smoothing(self, blocks_alpha: float) -> float:
        """The migration strength the final norm -> lm_head pair gets: ``smooth_lm_head_alpha``, else half of the
        blocks' (``blocks_alpha``, from `resolved_smooth_alpha`)."""
        return blocks_alpha / 2 if self.smooth_lm_head_alpha is None else float(self.smooth_lm_head_alpha)

    def validate(self) -> None:
        """Check every option (the message names the one at fault) and normalise the spellings."""
        self._validate_pattern()
        self._validate_numbers()
        self._validate_choices()
        self._validate_mixed()
        self._validate_reconstruct()

    def _validate_pattern(self) -> None:
        n, m = parse_pattern(self.pattern)
        if n:
            self.pattern = f"{n}:{m}"
            self.sparsity = 1.0 - n / m
        elif self.pattern == "dense":
            self.sparsity = 0.0
        else:
            if not isinstance(self.sparsity, (int, float)) or not (0.0 <= float(self.sparsity) < 1.0):
                raise ConfigError(f"sparsity: {self.sparsity!r} must lie in [0, 1)")
            self.sparsity = float(self.sparsity)

    def _validate_numbers(self) -> None:
        if self.bits is not None:
            if not isinstance(self.bits, int) or not (2 <= self.bits <= 8):
                raise ConfigError(f"bits: {self.bits!r} must be an integer in 2..8, or None for no quantization")
        if self.quantize_lm_head and self.bits is None:
            raise ConfigError("quantize_lm_head: needs bits (the lm_head is quantized, never pruned); set bits, e.g. 4")
        if self.group_size in (-1, 0):
            self.group_size = None
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"group_size: {self.group_size!r} must be a positive integer, or -1/None per channel")
        if not (isinstance(self.damp, (int, float)) and 0.0 < self.damp < 1e6):
            raise ConfigError(f"damp: {self.damp!r} must be a positive number (default 0.01)")
        for name in ("blocksize", "mask_blocksize", "nsamples", "seqlen"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: {v!r} must be a positive integer")
        if self.calib_batch_size is not None and (not isinstance(self.calib_batch_size, int) or self.calib_batch_size < 1):
            raise ConfigError(f"calib_batch_size: {self.calib_batch_size!r} must be a positive integer or None (auto)")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed: {self.seed!r} must be an integer")
        a = self.smooth_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise ConfigError(f"smooth_alpha: {a!r} must lie in [0, 1] (0: no smoothing) or be None (auto)")
        a = self.smooth_lm_head_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise ConfigError(f"smooth_lm_head_alpha: {a!r} must lie in [0, 1] (0: the lm_head pair unsmoothed) or be None "
                              "(half of smooth_alpha)")

    def _validate_choices(self) -> None:
        for name in ("targets", "ignore"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = [v]
                setattr(self, name, v)
            for rx in v:
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ConfigError(f"{name}: {rx!r} is not a valid regular expression ({e})") from None
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed and not (getattr(self, f.name) is None and f.default is None):
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} must be one of {list(allowed)}")

    def _validate_mixed(self) -> None:
        n = self.nm[0]
        for name in ("probes", "refine_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: {v!r} must be a positive integer")
        for name in ("alpha", "owl_lambda"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (0.0 <= v < 1.0):
                raise ConfigError(f"{name}: {v!r} must lie in [0, 1)")
        if not isinstance(self.owl_m, (int, float)) or self.owl_m <= 0:
            raise ConfigError(f"owl_m: {self.owl_m!r} must be a positive number (default 5)")
        for name in ("dense_fraction", "mix_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0):
                raise ConfigError(f"{name}: {v!r} must lie in [0, 1]")
        nm_pattern = bool(n)
        if self.allocation != "uniform" and nm_pattern:
            raise ConfigError(
                f"allocation: {self.allocation!r} cannot change the sparsity of an N:M layer ({self.pattern}); "
                "use dense_fraction (keep the most sensitive layers dense) or mix_pattern/mix_fraction instead")
        if self.allocation != "uniform" and self.pattern == "dense":
            raise ConfigError(f"allocation: {self.allocation!r} needs a pattern that prunes (not 'dense')")
        if (self.dense_fraction or self.mix_fraction) and not nm_pattern:
            raise ConfigError("dense_fraction / mix_fraction: only for an N:M pattern (e.g. 2:4); for unstructured "
                              "sparsity use allocation")
        if self.mix_pattern is not None:
            mn, mm = parse_pattern(self.mix_pattern)
            if not mn:
                raise ConfigError(f"mix_pattern: {self.mix_pattern!r} must be an N:M pattern such as '4:8'")
            self.mix_pattern = f"{mn}:{mm}"
        if self.mix_fraction and self.mix_pattern is None:
            raise ConfigError("mix_fraction: set mix_pattern too (e.g. '4:8')")
        if self.update == "admm" and self.pattern == "dense":
            raise ConfigError("update: 'admm' solves the weights on a pruning mask; pattern 'dense' prunes nothing")

    def _validate_reconstruct(self) -> None:
        for name in ("reconstruct_steps", "reconstruct_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "reconstruct_steps" else 1):
                raise ConfigError(f"{name}: {v!r} must be an integer >= {0 if name == 'reconstruct_steps' else 1}")
        if not isinstance(self.reconstruct_lr, (int, float)) or not self.reconstruct_lr > 0:
            raise ConfigError(f"reconstruct_lr: {self.reconstruct_lr!r} must be a positive number")
        if self.reconstruct_steps and self.pattern == "dense" and not self.bits:
            raise ConfigError("reconstruct_steps: pattern 'dense' without --bits compresses nothing to reconstruct")

    # ------------------------------------------------------------------ derived
    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    @property
    def prunes(self) -> bool:
        return self.pattern != "dense" and (self.nm[0] > 0 or self.sparsity > 0)

    # ------------------------------------------------------------------ JSON round trip
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparseGPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(known)}")
        if int(d.get("format_version", 1)) > cls.format_version:
            raise ConfigError(
                f"format_version {d['format_version']} is newer than this sparsegpt-export understands "
                f"({cls.format_version}); upgrade the package"
            )
        return cls(**d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string() + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> "SparseGPTConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)
