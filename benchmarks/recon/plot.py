"""Rate–quality plot (matplotlib, PNG): one panel per computed quality metric against bits per pixel; the
settings that one ``--codec`` spec expanded into form one curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import METRIC_NAMES, header_lines


def has_sweep(summary: dict[str, Any]) -> bool:
    """Whether some ``--codec`` spec ran at more than one setting (then a curve is worth drawing)."""
    specs = [c["spec"] for c in summary["codecs"]]
    return any(specs.count(s) > 1 for s in set(specs))


def rate_quality_plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Draw quality against bpp (log axis) for each available metric, one line per ``--codec`` spec, into ``path``.

    Returns ``path``, or ``None`` when no metric has values.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    metrics = [m for m in ("psnr", "ssim", "ms_ssim", "lpips", "rfid")
               if any(c[m] is not None for c in summary["codecs"])]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    curves: dict[str, list[dict[str, Any]]] = {}
    for c in summary["codecs"]:
        curves.setdefault(c["spec"] or c["label"], []).append(c)
    for ax, m in zip(axes[0], metrics):
        name, higher = METRIC_NAMES[m]
        if m == "lpips":
            name = "LPIPS-" + summary["config"].get("lpips_net", "alex")
        for spec, codecs in curves.items():
            pts = sorted((c["bpp_mean"], c[m]["mean"] if isinstance(c[m], dict) else c[m]) for c in codecs
                         if c[m] is not None and c["bpp_mean"])
            if not pts:
                continue
            tiny = any((c.get("weights") or {}).get("tiny_random") for c in codecs)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=spec + (" (TINY RANDOM WEIGHTS)" if tiny else ""))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    d = summary["dataset"]
    fig.suptitle(f"{Path(str(d['path'])).name}: N = {d['n']}, {d['resolution']}\n" + header_lines(summary)[-1],
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
