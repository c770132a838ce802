"""Standardisation with running statistics, for the memory read-out (the scripts' --memory-norm running).

The read-out of the frozen Transformer-XL is dominated by the current frame; what it carries of the past is a
small part of it (docs/probe.md). RunningNorm standardises each feature with the mean and variance of every
read-out seen so far, and clips to [-10, 10] as observation normalisation does (gymnasium's NormalizeObservation,
SB3's VecNormalize). It is a module with buffers, so the statistics are saved with the agent's weights and a
resumed or evaluated agent reads its memory as it was trained to; the statistics change only when `observe` is
called (once per update, after it), never in `forward`, so a rollout and the update on it see the same ones."""

import torch
import torch.nn as nn


class RunningNorm(nn.Module):
    def __init__(self, n_features, clip=10.0, eps=1e-8):
        super().__init__()
        self.clip, self.eps = clip, eps
        self.register_buffer("count", torch.zeros(()))  # before the first observe: mean 0, variance 1
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("var", torch.ones(n_features))

    def forward(self, x):
        return ((x - self.mean) / (self.var + self.eps).sqrt()).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def observe(self, x):
        """Merge x (..., n_features) into the statistics: the mean and (population) variance of everything
        observed, exactly (Chan et al.'s parallel update, in float64)."""
        x = x.reshape(-1, x.shape[-1]).double()
        count, mean, var = self.count.double(), self.mean.double(), self.var.double()
        total = count + x.shape[0]
        delta = x.mean(0) - mean
        m2 = var * count + x.var(0, unbiased=False) * x.shape[0] + delta**2 * (count * x.shape[0] / total)
        self.count.copy_(total)
        self.mean.copy_(mean + delta * (x.shape[0] / total))
        self.var.copy_(m2 / total)
