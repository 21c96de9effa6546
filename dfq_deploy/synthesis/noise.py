"""``noise``: Gaussian images in the model's input space, no optimisation: N(0, 1) under ImageNet's
normalisation, else at the mean/std a natural image has under the model's (:meth:`Job.prior_target`).

What users of ModelOpt/onnxruntime get today without data: the baseline every other method must beat.
"""

from __future__ import annotations

import torch

from dfq_deploy.synthesis.job import Job, MethodResult


def synthesize_noise(job: Job) -> MethodResult:
    """One Gaussian tensor per batch, drawn from that batch's generator."""
    seed = job.config.seed
    parts = [torch.randn(b.size, *job.input_shape, generator=b.generator(seed)) for b in job.batches]
    mean, std = (t.reshape(1, -1, 1, 1) for t in job.prior_target())
    return MethodResult(torch.cat(parts).to(job.device) * std + mean, None, None)
