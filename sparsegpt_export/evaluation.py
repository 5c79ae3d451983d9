"""Perplexity with the SparseGPT/GPTQ protocol.

Tokenize the whole text once (``\\r\\n`` normalised to ``\\n``), cut non-overlapping windows of ``seqlen``
tokens, ppl = exp(mean next-token NLL over the windows).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    text: str,
    seqlen: int = 2048,
    windows: Optional[int] = None,
    device: Optional[str] = None,
    progress: bool = False,
) -> dict[str, Any]:
    text = text.replace("\r\n", "\n")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    n = min(windows, available) if windows else available
    dev = torch.device(device) if device else next(model.parameters()).device
    model.eval()
    nlls = []
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="perplexity", unit="window")
    for i in it:
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(dev)
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="mean")
        nlls.append(nll.item())
    mean = sum(nlls) / len(nlls)
    return {"ppl": math.exp(mean), "nll": mean, "windows": n, "seqlen": seqlen, "tokens": int(ids.numel())}
