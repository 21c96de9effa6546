"""``noise``: Gaussian images in the model's input space, no optimisation: unit variance under ImageNet's
normalisation, else at the mean/std a natural image has under the model's (:meth:`Job.prior_target`);
white (i.i.d. pixels), pink (1/f) or dead leaves (the default above 64x64 px, where ``auto`` is this
method: :mod:`.spectrum`).

What users of ModelOpt/onnxruntime get today without data: the baseline every other method must beat.
"""

from __future__ import annotations

import torch

from dfq_deploy.synthesis.job import Job, MethodResult
from dfq_deploy.synthesis.spectrum import noise_images


def synthesize_noise(job: Job) -> MethodResult:
    """One noise tensor per batch, drawn from that batch's generator."""
    seed, spectrum = job.config.seed, job.spectrum
    parts = [noise_images(b.size, job.input_shape, b.generator(seed), spectrum) for b in job.batches]
    mean, std = (t.reshape(1, -1, 1, 1) for t in job.prior_target())
    return MethodResult(torch.cat(parts).to(job.device) * std + mean, None, None, {"spectrum": spectrum})
