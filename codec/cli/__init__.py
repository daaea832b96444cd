"""The ``cascade`` command line: the composition root. One module per command group; each command imports its
heavy modules when it runs, so ``cascade --help`` is instant. Nothing imports this package."""

from __future__ import annotations

import os
import sys

try:  # Ctrl-C while the command line starts up (imports) ends it quietly, as it does later (user_errors)
    import click

    from .bench import bench
    from .codec_commands import decode, encode, reconstruct
    from .dataset_commands import decode_dataset, encode_dataset_command, upgrade_store_command
    from .generate import generate
    from .train import train_command
    from .weights_commands import convert_command, demo_weights, info
except KeyboardInterrupt:
    sys.stderr.write("interrupted while starting; nothing was done\n")
    raise SystemExit(130) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cascade-codec")
def main() -> None:
    """cascade: Stable Cascade's 42× image codec (EfficientNet encoder + Stage B + Stage A).

    A 1024×1024 image becomes a 16×24×24 latent and comes back. Weights: the official
    Stable Cascade files in a folder (--weights DIR), the Hugging Face repo id, or
    `--model mini`, the small codec shipped in the package (works offline).
    """
    # PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU allocation of >= 2 MB: tensors that large are then
    # 2 MB-aligned and madvise(MADV_HUGEPAGE)d, so the kernel backs them with huge pages when its
    # transparent_hugepage mode is "madvise" (the usual default). Measured on the 2-core benchmark VM with
    # `python -m benchmarks.speed --thp-alloc`: a 1024² Stage A decode 16.3 s instead of 26.6 s (0.09 M page
    # faults instead of 5.9 M), an 8×768² EfficientNet batch 6.5 s instead of 9.3 s; outputs bitwise equal, peak
    # RSS unchanged. Linux only; a value the user set wins. Set here, when a command runs, not on import.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


for command in (encode, decode, reconstruct, info, convert_command, demo_weights, decode_dataset,
                encode_dataset_command, upgrade_store_command, bench, generate, train_command):
    main.add_command(command)
