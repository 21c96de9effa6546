"""``noise``: Gaussian N(0, 1) images in the model's input space, no optimisation.

What users of ModelOpt/onnxruntime get today without data: the baseline every other method must beat.
"""

from __future__ import annotations

import torch

from dfq_deploy.synthesis.job import Job, MethodResult


def synthesize_noise(job: Job) -> MethodResult:
    """One N(0, 1) tensor per batch, drawn from that batch's generator."""
    seed = job.config.seed
    parts = [torch.randn(b.size, *job.input_shape, generator=b.generator(seed)) for b in job.batches]
    return MethodResult(torch.cat(parts).to(job.device), None, None)
