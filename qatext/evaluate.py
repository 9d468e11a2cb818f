"""Perplexity on held-out text with non-overlapping windows, plus tokens/s and peak memory, and the
interval that a few seeds' results give."""

from __future__ import annotations

import math
import resource
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a [B, T + 1] batch (no KV cache: nothing generates after it)."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 2048, batch_size: int = 8, max_windows: int | None = None,
               progress: bool = True) -> dict:
    """exp(mean NLL) over non-overlapping windows of seq_len + 1 tokens (the papers' protocol)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"perplexity: seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    device = next(model.parameters()).device
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"perplexity: {len(tokens)} tokens are fewer than one window of {seq_len + 1}")
    windows = torch.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    nll, start = 0.0, time.perf_counter()
    for i in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, leave=False):
        batch = windows[i:i + batch_size].to(device)
        nll += causal_lm_loss(model, batch).item() * len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    mean = nll / n
    return {"ppl": math.exp(mean), "nll": mean, "tokens": n * seq_len, "tokens_per_s": n * seq_len / elapsed,
            "peak_memory_mb": peak_memory_mb(device)}


def mean_interval(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _t975(n - 1) * sd / math.sqrt(n)


def _t975(df: int) -> float:
    """The 97.5% quantile of Student's t: exact to 3 decimals for df <= 10, a series beyond."""
    table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
    if df <= len(table):
        return table[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
