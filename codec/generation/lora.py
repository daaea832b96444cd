"""LoRA for Stage C with the official semantics, and the LoRA file formats in circulation.

Official semantics (``modules/lora.py`` of Stability-AI/StableCascade, official.md §8):

* a LoRA on a weight ``W (out, in[, k, k])`` adds ``(lora_up @ lora_down) · alpha/rank``; for a
  k×k convolution the same ``(out, in)`` delta is broadcast over the kernel;
* ``lora_down`` starts at zero and ``lora_up`` ~ N(0, 1) (the reverse of the usual convention),
  ``alpha = 1``, so rank 4 scales by 0.25;
* targets are the modules whose name contains one of the filters (``'.attn'``): the
  ``in_proj_weight`` of every attention and the ``weight`` of its ``out_proj`` (2 per AttnBlock);
* the saved file is ``weights.{i}.lora_down``/``lora_up`` in ``model.modules()`` order after
  parametrisation, i.e. per attention ``out_proj`` first, then ``in_proj``; new-token deltas
  are ``embeddings.embeddings`` ``(N, width)`` and ``embeddings.indices`` ``(N,)``.

Other formats are read too (:func:`read_lora`): kohya / ComfyUI names
(``lora_prior_unet_<path with _>.lora_down.weight``, ``.alpha``, attention split into
``to_q/to_k/to_v/out_proj``) and diffusers / PEFT / OneTrainer names (dotted paths with
diffusers module names ``attention.to_q … to_out.0``, ``lora_A``/``lora_B`` or
``lora_down``/``lora_up``). A q/k/v split is joined into one exact ``in_proj`` LoRA of rank
3r (block-diagonal up matrix).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UsageError
from ..files import atomic_write
from ..weights import WeightsError, iter_tensors, read_header

DEFAULT_FILTERS = (".attn",)
META_LORA = "cascade_codec.lora"


class LoRA(nn.Module):
    """One low-rank update ``W + (lora_up @ lora_down) · scale · multiplier``; usable as a parametrisation.

    ``lora_down`` ``(rank, in)`` or ``(rank, in·k·k)``; ``lora_up`` ``(out, rank)``. A
    ``(out, in)`` delta on a k×k kernel is broadcast over the kernel (official).
    """

    def __init__(self, out_features: int, in_features: int, rank: int = 4, alpha: float = 1.0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.lora_down = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.lora_up = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        nn.init.normal_(self.lora_up, mean=0.0, std=1.0)
        self.scale = alpha / rank
        self.multiplier = 1.0
        self.enabled = True

    @property
    def rank(self) -> int:
        """Rank of the update."""
        return self.lora_down.shape[0]

    def delta(self, like: torch.Tensor) -> torch.Tensor:
        """The update shaped like the weight ``like`` (broadcast over a kernel when needed)."""
        d = (self.lora_up @ self.lora_down) * (self.scale * self.multiplier)
        if d.numel() == like.numel():
            return d.view(like.shape).to(like.dtype)
        return d.view(*like.shape[:2], *[1] * (like.ndim - 2)).to(like.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight) if self.enabled else weight


def _has_plain_param(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Parameter) and not parametrize.is_parametrized(module, name)


def lora_targets(model: nn.Module, filters: Sequence[str] = DEFAULT_FILTERS) -> list[str]:
    """Parameter paths a LoRA goes on, in the official saved order.

    A module whose name contains a filter gets a LoRA on ``weight`` (if a plain parameter),
    else on ``in_proj_weight``. The order is that of ``model.modules()`` once the official
    code has registered its parametrisations: a module's own LoRA comes after the LoRAs of
    its submodules (the ``parametrizations`` container is its last child).
    """
    order: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if name == "parametrizations":
                continue
            visit(child, f"{prefix}{name}.")
        path = prefix[:-1]
        if any(f in path for f in filters):
            if _has_plain_param(module, "weight"):
                order.append(f"{path}.weight")
            elif _has_plain_param(module, "in_proj_weight"):
                order.append(f"{path}.in_proj_weight")

    visit(model, "")
    return order


def _split(path: str) -> tuple[str, str]:
    module, _, param = path.rpartition(".")
    return module, param


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    module, param = _split(path)
    sub = model.get_submodule(module)
    if parametrize.is_parametrized(sub, param):
        return getattr(sub.parametrizations, param).original
    return getattr(sub, param)


class TokenDelta(nn.Module):
    """Learned additions to rows of a token-embedding matrix (the official ``ReToken``)."""

    def __init__(self, indices: Sequence[int], width: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(len(indices), width, dtype=dtype, device=device))
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.int64, device=device))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.indices.numel() == 0:
            return weight
        return weight.index_add(0, self.indices.to(weight.device), self.embeddings.to(weight.dtype))


class LoraNetwork(nn.Module):
    """A set of LoRAs for one model (``targets[i]`` ↔ ``weights[i]``) plus optional token deltas.

    Its state dict is the official file layout. :meth:`attach` registers the LoRAs as
    parametrisations (live, trainable); :meth:`detach` removes them; :meth:`merge` /
    :meth:`unmerge` add / subtract the updates into plain weights.
    """

    def __init__(self, targets: Sequence[str], loras: Sequence[LoRA], embeddings: TokenDelta | None = None):
        super().__init__()
        if len(targets) != len(loras):
            raise UsageError(f"{len(targets)} targets for {len(loras)} LoRAs")
        if embeddings is not None:
            self.embeddings = embeddings
        self.weights = nn.ModuleList(loras)
        self.targets = list(targets)
        # the model this network is attached to, in a tuple: a Module attribute would become a submodule, and
        # then network.parameters() / requires_grad_() / to() would reach the whole model
        self._attached: tuple[nn.Module, ...] = ()

    @classmethod
    def create(cls, model: nn.Module, filters: Sequence[str] = DEFAULT_FILTERS, rank: int = 4, alpha: float = 1.0,
               seed: int | None = None) -> "LoraNetwork":
        """New LoRAs (official init: down 0, up ~ N(0,1)) on every filtered weight of ``model``."""
        targets = lora_targets(model, filters)
        if not targets:
            raise UsageError(f"no module name of the model contains any of the LoRA filters {list(filters)}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        loras = []
        for path in targets:
            w = _weight(model, path)
            lora = LoRA(w.shape[0], w.shape[1], rank=rank, alpha=alpha, dtype=torch.float32)
            with torch.no_grad():
                lora.lora_up.copy_(torch.randn(lora.lora_up.shape, generator=gen))
            loras.append(lora.to(w.device))
        return cls(targets, loras)

    def set_multiplier(self, value: float) -> None:
        """Strength of every LoRA (1 = as trained; applies to attached and merged use)."""
        for lora in self.weights:
            lora.multiplier = float(value)

    def _modules_of(self, model: nn.Module) -> list[tuple[nn.Module, str, LoRA]]:
        out = []
        for path, lora in zip(self.targets, self.weights):
            module_path, param = _split(path)
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                raise WeightsError(f"the LoRA targets {path}, which this model does not have; was it made for "
                                   "another model (Stage C lite vs large)?") from None
            w = _weight(model, path)
            if lora.lora_up.shape[0] != w.shape[0] or lora.lora_down.shape[1] not in (w.shape[1], w[0].numel()):
                raise WeightsError(f"the LoRA for {path} has shapes up {list(lora.lora_up.shape)}, down "
                                   f"{list(lora.lora_down.shape)}, which do not fit the weight {list(w.shape)}; "
                                   "it was made for another model.")
            out.append((module, param, lora))
        return out

    def attach(self, model: nn.Module) -> "LoraNetwork":
        """Register every LoRA as a parametrisation of its weight (the model then trains/runs with it)."""
        if self._attached:
            raise RuntimeError("this LoRA network is already attached")
        for module, param, lora in self._modules_of(model):
            w = getattr(module, param)
            parametrize.register_parametrization(module, param, lora.to(w.device), unsafe=True)
        self._attached = (model,)
        return self

    def detach(self) -> None:
        """Remove the parametrisations, leaving the original weights unchanged."""
        if not self._attached:
            return
        for module, param, _ in self._modules_of(self._attached[0]):
            parametrize.remove_parametrizations(module, param, leave_parametrized=False)
        self._attached = ()

    @torch.no_grad()
    def _add(self, model: nn.Module, sign: float) -> None:
        if self._attached:
            raise RuntimeError("detach the LoRA network before merging it")
        for module, param, lora in self._modules_of(model):
            w = getattr(module, param)
            w.add_(lora.delta(w.float()).to(w.dtype), alpha=sign)

    def merge(self, model: nn.Module) -> None:
        """Add the updates (× multiplier) into the model's plain weights (fast inference, no parametrisation)."""
        self._add(model, 1.0)

    def unmerge(self, model: nn.Module) -> None:
        """Subtract what :meth:`merge` added (exact up to rounding)."""
        self._add(model, -1.0)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The official file layout: ``embeddings.*`` then ``weights.{i}.lora_down/lora_up``."""
        return {k: v.detach() for k, v in self.state_dict().items()}


# --------------------------------------------------------------------------- files

@dataclass
class LoraFileInfo:
    """What a LoRA file says about itself (our metadata; official files have none)."""

    rank: int
    alpha: float
    filters: list[str]
    tokens: list[list]
    pool_at: str | None
    format: str


def save_lora(network: LoraNetwork, path: str | os.PathLike, filters: Sequence[str] = DEFAULT_FILTERS,
              tokens: Sequence[Sequence] = (), pool_at: str | None = None, note: str | None = None) -> Path:
    """Write ``network`` in the official ``lora_*.safetensors`` layout (atomically).

    The tensors are exactly the official ones, so the official code loads the file; rank,
    alpha, filters, the trained tokens (``[[token, init_regex], …]``) and the pooled-position
    rule go into the safetensors metadata for loaders that want them.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
             for k, v in network.lora_state_dict().items()}
    alpha = network.weights[0].scale * network.weights[0].rank if len(network.weights) else 1.0
    meta = {"format": "pt", META_LORA: json.dumps({
        "rank": network.weights[0].rank if len(network.weights) else 0, "alpha": alpha,
        "filters": list(filters), "tokens": [list(t) for t in tokens], "pool_at": pool_at})}
    if note:
        meta["cascade_codec.note"] = note
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def _attention_paths(model: nn.Module) -> dict[str, str]:
    """Attention module paths (``….attention.attn``) by their block prefix (``….attention``)."""
    return {name.rsplit(".", 1)[0]: name for name, m in model.named_modules()
            if name.endswith(".attention.attn") and _has_plain_param(m, "in_proj_weight")}


def _name_table(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """Every name a LoRA file may use for a weight of ``model`` → (our parameter path, q/k/v chunk or None).

    Covers our (= official) dotted names, kohya's underscored names, ComfyUI's and
    diffusers' attention names.
    """
    table: dict[str, tuple[str, int | None]] = {}

    def add(name: str, target: tuple[str, int | None]) -> None:
        table[name] = target
        table[name.replace(".", "_")] = target

    for name, module in model.named_modules():
        if name and _has_plain_param(module, "weight") and isinstance(module, (nn.Linear, nn.Conv2d)):
            add(name, (f"{name}.weight", None))
    for block, attn in _attention_paths(model).items():
        add(attn, (f"{attn}.in_proj_weight", None))
        for i, qkv in enumerate(("to_q", "to_k", "to_v")):
            add(f"{attn}.{qkv}", (f"{attn}.in_proj_weight", i))
            add(f"{block}.{qkv}", (f"{attn}.in_proj_weight", i))
        add(f"{block}.to_out.0", (f"{attn}.out_proj.weight", None))
    return table


_PREFIXES = ("lora_prior_unet_", "lora_prior_unet.", "lora_unet_", "base_model.model.", "prior.", "unet.",
             "transformer.", "diffusion_model.", "model.diffusion_model.", "")
_TEXT_PREFIXES = ("lora_prior_te_", "lora_te_", "lora_te1_", "text_encoder.", "lora_prior_te.")
_PAIR = re.compile(r"^(?P<name>.+?)\.(?P<kind>lora_down|lora_up|lora_A|lora_B|alpha)(?:\.weight)?$")


def _read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header = read_header(path)
    return dict(iter_tensors(header, torch.float32)), header.metadata


def _official_info(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> LoraFileInfo:
    own = json.loads(metadata[META_LORA]) if META_LORA in metadata else {}
    rank = tensors["weights.0.lora_down"].shape[0] if "weights.0.lora_down" in tensors else 0
    return LoraFileInfo(rank=own.get("rank", rank), alpha=float(own.get("alpha", 1.0)),
                        filters=list(own.get("filters", DEFAULT_FILTERS)), tokens=own.get("tokens", []),
                        pool_at=own.get("pool_at"), format="official")


def read_lora(path: str | os.PathLike, model: nn.Module, filters: Sequence[str] | None = None,
              alpha: float | None = None) -> tuple[LoraNetwork, LoraFileInfo, dict[str, torch.Tensor]]:
    """Read a LoRA file of any supported naming into a :class:`LoraNetwork` for ``model``.

    Returns ``(network, info, token_state)``; ``token_state`` holds ``embeddings.embeddings``
    and ``embeddings.indices`` when the file trains tokens (official layout), else is empty.
    Official files are positional: their i-th LoRA goes on the i-th target of
    :func:`lora_targets` with ``filters`` (default: from the file, else ``['.attn']``).
    ``alpha`` overrides the scale of official files (default: file metadata, else 1).
    """
    tensors, metadata = _read_tensors(path)
    if any(re.fullmatch(r"weights\.\d+\.lora_(down|up)", k) for k in tensors):
        return _read_official(path, model, tensors, metadata, filters, alpha)
    return _read_named(path, model, tensors)


def read_lora_tokens(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraFileInfo | None]:
    """The trained-token part of a LoRA file without a model: ``(token_state, info)``; empty for files that
    train no tokens (and ``info`` is ``None`` for files not in the official layout)."""
    tensors, metadata = _read_tensors(path)
    if not any(re.fullmatch(r"weights\.\d+\.lora_(down|up)", k) for k in tensors):
        return {}, None
    return {k: v for k, v in tensors.items() if k.startswith("embeddings.")}, _official_info(metadata, tensors)


def _read_official(path, model, tensors, metadata, filters, alpha):
    info = _official_info(metadata, tensors)
    if filters is not None:
        info.filters = list(filters)
    if alpha is not None:
        info.alpha = float(alpha)
    targets = lora_targets(model, info.filters)
    n = len({k.split(".")[1] for k in tensors if k.startswith("weights.")})
    if n != len(targets):
        raise WeightsError(f"{path} has {n} LoRA weights but this model has {len(targets)} modules matching the "
                           f"filters {info.filters}; the file was made for another model or other filters.")
    loras = []
    for i, target in enumerate(targets):
        down, up = tensors.get(f"weights.{i}.lora_down"), tensors.get(f"weights.{i}.lora_up")
        if down is None or up is None:
            raise WeightsError(f"{path} lacks weights.{i}.lora_down or weights.{i}.lora_up.")
        loras.append(_lora_from(down, up, info.alpha / down.shape[0], f"{path}: weights.{i} ({target})"))
    network = LoraNetwork(targets, loras)
    network._modules_of(model)  # shape check with a clear message
    token_state = {k: v for k, v in tensors.items() if k.startswith("embeddings.")}
    return network, info, token_state


def _lora_from(down: torch.Tensor, up: torch.Tensor, scale: float, what: str) -> LoRA:
    down = down.reshape(down.shape[0], -1)
    up = up.reshape(up.shape[0], -1)
    if up.shape[1] != down.shape[0]:
        raise WeightsError(f"{what}: lora_up {list(up.shape)} and lora_down {list(down.shape)} do not multiply.")
    lora = LoRA(up.shape[0], down.shape[1], rank=down.shape[0])
    with torch.no_grad():
        lora.lora_down.copy_(down)
        lora.lora_up.copy_(up)
    lora.scale = scale
    return lora


def _strip(name: str, prefixes: Iterable[str], table: dict) -> str | None:
    for p in prefixes:
        if name.startswith(p) and name[len(p):] in table:
            return name[len(p):]
    return None


def _read_named(path, model, tensors) -> tuple[LoraNetwork, LoraFileInfo, dict[str, torch.Tensor]]:
    table = _name_table(model)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in tensors.items():
        m = _PAIR.match(key)
        if not m:
            other.append(key)
            continue
        kind = {"lora_A": "lora_down", "lora_B": "lora_up"}.get(m["kind"], m["kind"])
        groups.setdefault(m["name"], {})[kind] = value
    text_keys = [k for k in groups if k.startswith(_TEXT_PREFIXES)]
    if text_keys:
        raise WeightsError(f"{path} also changes the text encoder ({len(text_keys)} LoRA(s), e.g. {text_keys[0]}); "
                           "only Stage C LoRAs are supported here. Export the LoRA without text-encoder training.")
    unknown = [k for k in groups if _strip(k, _PREFIXES, table) is None]
    if unknown or not groups:
        shown = ", ".join(unknown[:3]) if unknown else ", ".join(other[:3])
        raise WeightsError(f"{path} is not a Stage C LoRA this tool can read: {len(unknown) or len(other)} key(s) "
                           f"match no weight of the model (e.g. {shown}). Supported: the official layout "
                           "(weights.N.lora_down), kohya/ComfyUI (lora_prior_unet_…) and diffusers/PEFT names.")
    per_param: dict[str, list[tuple[int | None, torch.Tensor, torch.Tensor, float]]] = {}
    for name, parts in groups.items():
        if "lora_down" not in parts or "lora_up" not in parts:
            raise WeightsError(f"{path}: {name} lacks its lora_down or lora_up tensor.")
        down = parts["lora_down"].reshape(parts["lora_down"].shape[0], -1)
        up = parts["lora_up"].reshape(parts["lora_up"].shape[0], -1)
        rank = down.shape[0]
        # kohya convention: scale alpha/rank, alpha defaulting to the rank (scale 1)
        scale = float(parts["alpha"].item()) / rank if "alpha" in parts else 1.0
        param, chunk = table[_strip(name, _PREFIXES, table)]
        per_param.setdefault(param, []).append((chunk, down, up, scale))
    order = {p: i for i, p in enumerate(lora_targets(model, ("",)))}
    targets, loras = [], []
    for param in sorted(per_param, key=lambda p: order.get(p, len(order))):
        entries = per_param[param]
        if len(entries) == 1 and entries[0][0] is None:
            _, down, up, scale = entries[0]
            loras.append(_lora_from(down, up, scale, f"{path}: {param}"))
        else:
            loras.append(_join_chunks(param, entries, _weight(model, param), path))
        targets.append(param)
    network = LoraNetwork(targets, loras)
    network._modules_of(model)
    info = LoraFileInfo(rank=max(l.rank for l in loras), alpha=float("nan"), filters=[], tokens=[], pool_at=None,
                        format="kohya/diffusers")
    return network, info, {}


def _join_chunks(param: str, entries, weight: torch.Tensor, path) -> LoRA:
    """q/k/v LoRAs of one packed ``in_proj_weight`` → one LoRA of the summed rank, block-diagonal up."""
    if any(chunk is None for chunk, *_ in entries):
        raise WeightsError(f"{path}: {param} has both a whole-matrix LoRA and q/k/v LoRAs.")
    c = weight.shape[0] // 3
    downs, ups = [], []
    rank_total = sum(d.shape[0] for _, d, _, _ in entries)
    col = 0
    for chunk, down, up, scale in sorted(entries, key=lambda e: e[0]):
        block = torch.zeros(weight.shape[0], rank_total)
        block[chunk * c:(chunk + 1) * c, col:col + down.shape[0]] = up * scale
        ups.append(block)
        downs.append(down)
        col += down.shape[0]
    lora = _lora_from(torch.cat(downs), sum(ups), 1.0, f"{path}: {param}")
    return lora


def to_kohya(network: LoraNetwork, prefix: str = "lora_prior_unet_") -> dict[str, torch.Tensor]:
    """The network in kohya/ComfyUI naming (attention split into to_q/to_k/to_v; ``alpha`` = scale·rank).

    ComfyUI loads Stage C LoRAs by these names; the official layout it does not read.
    """
    out: dict[str, torch.Tensor] = {}
    for path, lora in zip(network.targets, network.weights):
        module, param = _split(path)
        down, up = lora.lora_down.detach().float(), lora.lora_up.detach().float()
        alpha = torch.tensor(lora.scale * lora.rank)
        if param == "in_proj_weight":
            for name, part in zip(("to_q", "to_k", "to_v"), up.chunk(3, dim=0)):
                key = prefix + f"{module}.{name}".replace(".", "_")
                out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.clone(), part.contiguous()
                out[f"{key}.alpha"] = alpha.clone()
        else:
            key = prefix + module.replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.clone(), up.clone()
            out[f"{key}.alpha"] = alpha
    return out
