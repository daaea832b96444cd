"""``cascade bench``: reconstruction benchmarks and report comparison."""

from __future__ import annotations

from pathlib import Path

import click

from .common import WEIGHTS_HELP, user_errors


@click.group()
def bench() -> None:
    """Benchmarks: reconstruction quality of Stable Cascade against other codecs, and report comparison."""


CODEC_HELP = ("Codec to run, FAMILY[:key=value,…]; repeat for several. A key with several values "
              "(scale=0.5,0.75,1.0) is a sweep. Families: sc (Stable Cascade: stage_b=auto|lite|large|mini, "
              "steps=N, cfg=X|none, sampler=ddpm|ddim (each default: the model's own; official 10, 1.1, ddpm), cfg_rho=0.7, "
              "scale=0.75 encoder input fraction, "
              "resize=nearest|bilinear); jpeg, webp, avif, jxl (quality=10,25,50,75,90; jxl needs the jxl "
              "extra); jpeg2000 (ratio=400,200,100,50,20); jpeg-budget, webp-budget, avif-budget, jxl-budget, "
              "jpeg2000-budget (the setting with the largest file within the float16 latent's bytes at scale=0.75, "
              "or bytes=N); bicubic (down/up to the latent's number of "
              "values at scale=0.75, or values=N); vae (diffusers AutoencoderKL/AutoencoderDC: path=DIR, name=). "
              "Default: sc, jpeg-budget, bicubic.")


@bench.command("recon")
@click.argument("dataset", metavar="DATASET")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Report folder: per_image.csv, summary.json, table.md, report.html (open it in a browser), "
                   "grid.png, rate_quality.png. Running "
                   "the same command again resumes an interrupted run.")
@click.option("--codec", "codecs", multiple=True, metavar="SPEC", help=CODEC_HELP)
@click.option("--size", type=click.IntRange(32), default=None,
              help="Side of the square test images in pixels, a multiple of 32 (default 1024): short side "
                   "resized to it (antialiased bilinear), centre square crop. Not for latent stores.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N images of DATASET (in its deterministic order).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of Stage B's sampling noise (per image: derived from the seed and the image id). Same "
                   "seed, same numbers.")
@click.option("--weights", "--model", "-w", default=None, metavar="DIR|REPO|mini", help=WEIGHTS_HELP)
@click.option("--device", default="auto", show_default=True,
              help="Torch device for the models and metrics: auto (CUDA if available), cpu, cuda, cuda:1, …")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Stable Cascade Stage B precision (auto: bf16 on CUDA, fp32 on CPU). VAEs run in fp32.")
@click.option("--lpips-net", type=click.Choice(["alex", "vgg"]), default="alex", show_default=True,
              help="LPIPS trunk: alex (the usual LPIPS) or vgg.")
@click.option("--lpips-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ImageNet weights of the LPIPS trunk (torchvision's alexnet-owt-7be5be79.pth or "
                   "vgg16-397923af.pth). Default: that file in the torch hub cache "
                   "($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints); without it LPIPS is skipped "
                   "and the report says so.")
@click.option("--fid-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inception-v3 weights for rFID (torch-fidelity's weights-inception-2015-12-05-6726825d.pth). "
                   "Default: that file in the torch hub cache; without it rFID is skipped and the report says so.")
@click.option("--no-lpips", is_flag=True, help="Do not compute LPIPS.")
@click.option("--no-fid", is_flag=True, help="Do not compute rFID.")
@click.option("--grid-images", type=click.IntRange(0), default=3, show_default=True,
              help="Images shown in grid.png (N spread evenly over the set), each beside every codec's "
                   "reconstruction with a zoomed centre crop; 0: no grid.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for torch (default: torch's choice); on a busy machine 1 is often faster.")
@click.option("--overwrite", is_flag=True, help="Start afresh in a report folder that holds an earlier run.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def bench_recon(dataset, output, codecs, size, limit, seed, weights, device, dtype, lpips_net, lpips_weights,
                fid_weights, no_lpips, no_fid, grid_images, threads, overwrite, no_progress) -> None:
    """Reconstruction quality and speed of codecs on DATASET, with reports in OUTPUT.

    DATASET: a folder of images, a CSV/JSONL manifest, webdataset .tar shards, or a latent
    store from `cascade encode-dataset` (decode-only: the stored latents are decoded).
    Metrics on uint8-rounded reconstructions: PSNR, SSIM, MS-SSIM, LPIPS, rFID, bits per
    pixel, compression ratio, encode/decode seconds per image, peak memory.
    """
    from benchmarks.recon import DEFAULT_CODECS, ReconConfig, run_recon
    from benchmarks.recon.report import TABLE_NAME

    from ..files import check_output

    check_output(output, folder=True)

    cfg = ReconConfig(dataset=dataset, output=str(output), codecs=list(codecs or DEFAULT_CODECS), size=size,
                      limit=limit, seed=seed, weights=weights, device=device, dtype=dtype, lpips_net=lpips_net,
                      lpips_weights=str(lpips_weights) if lpips_weights else None,
                      fid_weights=str(fid_weights) if fid_weights else None, lpips=not no_lpips,
                      fid=not no_fid, grid_images=grid_images, threads=threads, overwrite=overwrite,
                      progress=not no_progress)
    try:
        summary = run_recon(cfg, log=lambda m: click.secho(m, fg="yellow" if m.startswith("note") else None,
                                                           err=True))
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; run the same command again to resume from {output}") from None
    click.echo((output / TABLE_NAME).read_text(encoding="utf-8"), nl=False)
    files = [f for f in summary["files"].values() if f]
    click.echo(f"\nreport: {output}/ ({', '.join(files)})")


@bench.command("compare")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the comparison page (both tables, one rate–quality plot, the images of both "
                   "runs side by side). Default: compare.html in B's report folder.")
@user_errors
def bench_compare(a, b, html_path) -> None:
    """Print the differences B − A of two reports (folders from `cascade bench recon` or their summary.json), and
    write them as a web page."""
    from benchmarks.recon.html_report import RunView, write_compare_report
    from benchmarks.recon.report import compare, load_summary

    sa, sb = load_summary(a), load_summary(b)
    click.echo(compare(sa, sb, str(a), str(b)), nl=False)
    folder_a, folder_b = (p if p.is_dir() else p.parent for p in (a, b))
    page = write_compare_report(html_path or folder_b / "compare.html", RunView("A", sa, folder_a),
                                RunView("B", sb, folder_b))
    click.echo(f"\nreport: {page}")
