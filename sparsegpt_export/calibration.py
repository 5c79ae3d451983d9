"""Calibration windows: ``LongTensor [nsamples, seqlen]`` following the SparseGPT/GPTQ protocol.

Sources: a `datasets` name (``c4``, ``wikitext2``, ``ptb``), a local ``.txt`` / ``.jsonl`` / ``.parquet`` file,
a list of strings, or pre-tokenized ids (a tensor, or a ``.safetensors`` file holding ``input_ids``
[n, seqlen], used as is: its first ``nsamples`` rows).

Document corpora (C4, .jsonl, .parquet, a list of strings) draw a random document long enough for a window
and a random window inside it; running text (WikiText-2, PTB, .txt) is tokenized once and random windows are
cut from it. The generator is seeded, so the same seed gives the same windows.
"""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import torch


class CalibrationError(ValueError):
    """The calibration data cannot give the windows asked for; the message names the source."""


DatasetSpec = Union[str, Path, Sequence[str], torch.Tensor]
HUB_DATASETS = ("c4", "wikitext2", "ptb")


def _read_documents(path: Path, rows: tuple[int, int] | None = None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8").replace("\r\n", "\n")]
    if suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                text = obj.get("text") if isinstance(obj, dict) else obj
                if not isinstance(text, str):
                    raise CalibrationError(f"{path}:{lineno}: expected an object with a string field 'text'")
                docs.append(text)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CalibrationError(f"{path}: no column 'text' (columns: {table.column_names})")
        docs = table.column("text").to_pylist()
    else:
        raise CalibrationError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl, .parquet or .safetensors")
    if rows is not None:
        docs = docs[rows[0]:rows[1]]
    return [d.replace("\r\n", "\n") for d in docs if d]


def _hub_documents(name: str) -> tuple[list[str], bool]:
    """(documents, is_running_text) of a named hub dataset, training split."""
    try:
        from datasets import load_dataset

        if name == "c4":
            ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
            return list(ds["text"][:20000]), False
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            return ["\n\n".join(ds["text"])], True
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split="train")
            return ["\n\n".join(ds["sentence"])], True
    except Exception as e:  # offline, hub unreachable, gated, ...
        raise CalibrationError(
            f"dataset {name!r} could not be loaded from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}); "
            "offline, pass a local .txt, .jsonl, .parquet or pre-tokenized .safetensors file instead"
        ) from None
    raise CalibrationError(f"dataset {name!r}: unknown name; use one of {HUB_DATASETS} or a local file path")


def _check_ids(ids: torch.Tensor, source: str, nsamples: int, seqlen: int) -> torch.Tensor:
    if ids.dim() != 2:
        raise CalibrationError(f"{source}: input_ids must have shape [n, seqlen], got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise CalibrationError(f"{source}: input_ids must be integers, got {ids.dtype}")
    if ids.shape[1] < seqlen:
        raise CalibrationError(
            f"{source}: windows of {ids.shape[1]} tokens are shorter than seqlen={seqlen}; "
            "lower --seqlen or give longer windows"
        )
    if ids.shape[0] < nsamples:
        warnings.warn(f"{source}: only {ids.shape[0]} windows, fewer than nsamples={nsamples}; using all of them")
    return ids[:nsamples, :seqlen].to(torch.long).contiguous()


def get_calibration_data(
    dataset: DatasetSpec,
    tokenizer: Any = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """``LongTensor [nsamples, seqlen]`` of calibration windows from ``dataset`` (see the module doc)."""
    if isinstance(dataset, torch.Tensor):
        return _check_ids(dataset, "calibration tensor", nsamples, seqlen)
    docs, running_text, source = _documents(dataset)
    if isinstance(docs, torch.Tensor):  # a pre-tokenized file
        return _check_ids(docs, source, nsamples, seqlen)
    if tokenizer is None:
        raise CalibrationError(f"{source}: text calibration data needs a tokenizer")
    rng = random.Random(seed)
    if running_text:
        ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
        return _windows_from_stream(ids, nsamples, seqlen, rng, source)
    return _windows_from_documents(docs, tokenizer, nsamples, seqlen, rng, source)


def _documents(dataset: DatasetSpec) -> tuple[Any, bool, str]:
    """``(documents or an input_ids tensor, whether they are one running text, where they came from)``."""
    if isinstance(dataset, (str, Path)) and (Path(dataset).suffix.lower() in (".txt", ".jsonl", ".parquet", ".safetensors")
                                            or Path(dataset).exists()):
        path = Path(dataset)
        if not path.is_file():
            raise CalibrationError(f"{path}: calibration file not found")
        if path.suffix.lower() == ".safetensors":
            return _safetensors_ids(path), False, str(path)
        return _read_documents(path), path.suffix.lower() == ".txt", str(path)
    if isinstance(dataset, str):
        docs, running_text = _hub_documents(dataset)
        return docs, running_text, dataset
    if isinstance(dataset, (list, tuple)) and all(isinstance(d, str) for d in dataset):
        return list(dataset), False, "list of strings"
    raise CalibrationError(
        f"calibration dataset of type {type(dataset).__name__} is not supported; pass a dataset name, a file "
        "path, a list of strings or a LongTensor of input_ids"
    )


def _safetensors_ids(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CalibrationError(f"{path}: not a readable safetensors file ({e})") from None
    if "input_ids" not in tensors:
        raise CalibrationError(f"{path}: no tensor named 'input_ids' (found {sorted(tensors)})")
    return tensors["input_ids"]


def _windows_from_documents(docs: list[str], tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random,
                            source: str) -> torch.Tensor:
    """A random document with enough tokens, a random window inside it, until ``nsamples``; the rest cut from the
    short documents joined."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    out = []
    short: list[torch.Tensor] = []
    for i in order:
        ids = tokenizer(docs[i], return_tensors="pt").input_ids[0]
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            out.append(ids[start:start + seqlen])
            if len(out) == nsamples:
                break
        else:
            short.append(ids)
    if len(out) < nsamples:
        # not enough long documents: cut the remaining windows from the short ones, concatenated
        stream = torch.cat(short) if short else torch.empty(0, dtype=torch.long)
        if stream.numel() >= seqlen:
            more = _windows_from_stream(stream, nsamples - len(out), seqlen, rng, source)
            out.extend(list(more))
    if not out:
        raise CalibrationError(
            f"{source}: fewer calibration tokens than seqlen={seqlen}; give more text or lower --seqlen"
        )
    if len(out) < nsamples:
        warnings.warn(f"{source}: only {len(out)} windows of {seqlen} tokens could be drawn (nsamples={nsamples})")
    return torch.stack(out).to(torch.long)


def _windows_from_stream(ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random, source: str) -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise CalibrationError(
            f"{source}: {ids.numel()} tokens in all, fewer than seqlen={seqlen} + 1; give more text or lower --seqlen"
        )
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts]).to(torch.long)


def load_eval_text(dataset: str | Path, rows: tuple[int, int] | None = None) -> str:
    """The evaluation text: a file (``.txt`` as is; ``.jsonl``/``.parquet`` rows joined with a space) or a hub name's test split."""
    p = Path(dataset)
    if p.suffix.lower() in (".txt", ".jsonl", ".parquet") or p.exists():
        if not p.is_file():
            raise CalibrationError(f"{p}: evaluation file not found")
        docs = _read_documents(p, rows)
        return docs[0] if p.suffix.lower() == ".txt" else " ".join(docs)
    try:
        from datasets import load_dataset

        if dataset == "wikitext2":
            return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        if dataset == "ptb":
            return " ".join(load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"])
        if dataset == "c4":
            ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
            lo, hi = rows or (0, 1100)
            return " ".join(ds["text"][lo:hi])
    except Exception as e:
        raise CalibrationError(
            f"dataset {dataset!r} could not be loaded from the Hugging Face hub ({type(e).__name__}); "
            "offline, pass a local .txt, .jsonl or .parquet file instead"
        ) from None
    raise CalibrationError(f"dataset {dataset!r}: unknown name; use one of {HUB_DATASETS} or a local file path")
