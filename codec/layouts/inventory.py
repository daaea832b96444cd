"""What a weight source holds: every Stable Cascade file in any layout, read from headers only."""

from __future__ import annotations

from dataclasses import dataclass

from .. import weights as W
from .locate import locate_all, open_component
from .official import COMPONENTS, EXTRA_COMPONENTS, Located, default_config, describe_stage_a


@dataclass(frozen=True)
class InventoryRow:
    """One model file (or diffusers folder variant) of a weight source, from its headers only."""

    label: str
    layout: str
    tensors: int
    params: int
    dtypes: str
    note: str | None
    detail: str | None


def inventory(src: W.WeightSource) -> list[InventoryRow]:
    """Every Stable Cascade file of ``src`` in any layout (for a repo id: what the local cache holds)."""
    locs = [loc for component in COMPONENTS + EXTRA_COMPONENTS for loc in locate_all(src, component)]
    locs += [Located.official_file(W.EMPTY_CAPTION_FILE)] if src.has(W.EMPTY_CAPTION_FILE) else []
    rows = []
    for loc in locs:
        ckpt, config = open_component(src, loc)
        if loc.component == "stage_a":
            detail = describe_stage_a((config or default_config("stage_a"))["scale_factor"])
        else:
            detail = "own config" if loc.layout == "official" and config else None
        rows.append(InventoryRow(loc.label, loc.layout, len(ckpt.tensors), ckpt.n_params(),
                                 ",".join(sorted(str(d).replace("torch.", "") for d in ckpt.dtypes())),
                                 ckpt.metadata.get(W.META_NOTE), detail))
    return rows
