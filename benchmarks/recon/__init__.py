"""Reconstruction benchmark: ``cascade bench recon`` and ``cascade bench compare``.

Stable Cascade (Stage B lite/large, any steps/cfg/sampler/encoder scale) against JPEG at
the latent's byte budget and over a quality sweep, bicubic down/up-sampling with the
latent's number of values, and any local diffusers ``AutoencoderKL``/``AutoencoderDC``; on
a folder, a manifest, tar shards or a latent store (decode-only). Metrics follow the
field's conventions (uint8-rounded reconstructions; PSNR per image then averaged; SSIM
11-px Gaussian σ 1.5 on RGB, data range 255; MS-SSIM; LPIPS v0.1 on [-1, 1]; rFID from
Inception pool3 against the originals of the same set), streamed so memory does not grow
with the number of images. Reports: per-image CSV (resumable), ``summary.json``
(versioned schema), a Markdown table, a rate–quality plot when a sweep ran, and an image
grid.

Modules: ``data`` (inputs), ``codecs`` (codecs and the ``--codec`` spec language),
``jpeg`` (JPEG and the byte-budget search), ``metrics``, ``measure`` (peak memory),
``report`` (CSV, summary schema, Markdown, compare), ``grid``, ``plot``, ``run``.
"""

from .run import DEFAULT_CODECS, ReconConfig, run_recon

__all__ = ["DEFAULT_CODECS", "ReconConfig", "run_recon"]
