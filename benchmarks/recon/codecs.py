"""The codecs a benchmark run compares, and the ``--codec`` spec language.

A spec is ``FAMILY[:key=value,...]``; a key may take several values (``scale=0.5,0.75,1.0``:
a value without ``=`` belongs to the key before it), and a spec with lists expands into one
codec per combination — a sweep, which gives a rate–quality curve.

Families (defaults in brackets):

* ``sc`` — Stable Cascade through :class:`codec.Codec`: ``stage_b`` [lite] | large,
  ``steps``, ``cfg`` (``none``: no guidance), ``sampler`` ddpm | ddim [each: the model's own, see
  :attr:`codec.Codec.sampler_defaults`; official 10, 1.1, ddpm], ``cfg_rho`` [0.7], ``scale`` [0.75] (encoder input as a fraction of the output size: 0.5 → 16²,
  0.75 → 24², 1.0 → 32² latents at 1024²), ``resize`` [nearest] | bilinear. The latent is
  stored as float16 (its bytes are the rate) and decoded from that. Stage B sampling is
  seeded per image from ``--seed`` and the image id. On a latent store the stored latents
  are decoded (decode-only; ``scale``/``resize`` are fixed by the store).
* ``jpeg``, ``webp``, ``avif``, ``jxl`` — at ``quality`` [10,25,50,75,90] (a sweep);
  ``jpeg2000`` at compression ``ratio`` [400,200,100,50,20]. Libraries and settings: :mod:`.formats`.
* ``jpeg-budget``, ``webp-budget``, ``avif-budget``, ``jxl-budget``, ``jpeg2000-budget`` — the
  setting with the largest file that fits the byte budget of the Stable Cascade latent at
  ``scale`` [0.75] (16×24×24 float16 = 18,432 bytes at 1024²; on a latent store: the stored
  latent), or ``bytes`` given directly.
* ``bicubic`` — bicubic down-sampling to as many uint8 RGB values as the latent at ``scale``
  [0.75] has values (or ``values``), aspect kept, then bicubic up-sampling (Pillow, antialiased).
* ``vae`` — a diffusers ``AutoencoderKL`` or ``AutoencoderDC`` from a local folder ``path``
  (SD/SDXL/FLUX VAE, DC-AE); ``name`` [folder name]. Deterministic (posterior mode); the latent
  is stored as float16. Images are padded (reflect) to the model's stride and cropped back.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from codec.codec import DEFAULT, LATENT_STRIDE, encoder_input_size
from codec.devices import resolve_device
from codec.errors import MissingInputError, UsageError
from codec.images import from_uint8, pil_to_uint8, to_uint8, uint8_to_pil

from .formats import FORMATS, encode_under_budget

LATENT_CHANNELS = 16
STORED_LATENT_BYTES = 2  # float16


def _choice(*options: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if v not in options:
            raise UsageError(f"must be one of {', '.join(options)}")
        return v
    return parse


def _cfg(v: str) -> float | None:
    return None if v.lower() in ("none", "off") else float(v)


def _quality(v: str) -> int:
    q = int(v)
    if not 1 <= q <= 100:
        raise UsageError("must be an integer in 1…100")
    return q


def _scale(v: str) -> float:
    s = float(v)
    if not 0 < s <= 1.5:
        raise UsageError("must be in (0, 1.5]")
    return s


def _ratio(v: str) -> float:
    r = float(v)
    if not 2 <= r <= 4000:
        raise UsageError("must be a compression ratio in 2…4000")
    return r


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise UsageError("must be ≥ 1")
    return n


# family → key → (default, parser). A list default is a sweep even when the key is not given.
FAMILIES: dict[str, dict[str, tuple[Any, Callable[[str], Any]]]] = {
    "sc": {"stage_b": ("auto", _choice("auto", "lite", "large", "mini")), "steps": (None, _positive),
           "cfg": (DEFAULT, _cfg), "cfg_rho": (0.7, float), "sampler": (None, _choice("ddpm", "ddim")),
           "scale": (0.75, _scale),
           "resize": ("nearest", _choice("nearest", "bilinear"))},
    "bicubic": {"scale": (0.75, _scale), "values": (None, _positive)},
    "vae": {"path": (None, str), "name": (None, str)},
}
BUDGET_SUFFIX = "-budget"
for _fmt in FORMATS.values():  # every classical codec: a sweep of fixed settings, and the byte-budget search
    FAMILIES[_fmt.name] = {_fmt.knob: (list(_fmt.sweep), _ratio if _fmt.knob == "ratio" else _quality)}
    FAMILIES[_fmt.name + BUDGET_SUFFIX] = {"scale": (0.75, _scale), "bytes": (None, _positive)}
REQUIRED = {"vae": ("path",)}


@dataclass(frozen=True)
class CodecConfig:
    """One codec setting: ``family``, every parameter, which keys were given (they name the label), and the
    ``--codec`` spec it came from (the settings of one spec form one curve)."""

    family: str
    params: dict[str, Any]
    shown: tuple[str, ...]
    spec: str = ""

    @property
    def label(self) -> str:
        """Short unique name: the family plus the keys given, e.g. ``sc:scale=0.5``, ``jpeg:quality=10``."""
        if not self.shown:
            return self.family
        return self.family + ":" + ",".join(f"{k}={_fmt(self.params[k])}" for k in self.shown)


def _fmt(v: Any) -> str:
    return "none" if v is None else str(v)


def parse_spec(spec: str) -> list[CodecConfig]:
    """``FAMILY[:key=v1,v2,key2=v]`` → one :class:`CodecConfig` per combination of values."""
    family, _, rest = spec.strip().partition(":")
    if family not in FAMILIES:
        raise UsageError(f"--codec {spec!r}: unknown codec {family!r}; choose one of {', '.join(FAMILIES)}")
    keys = FAMILIES[family]
    given: dict[str, list[str]] = {}
    current = None
    for part in filter(None, (p.strip() for p in rest.split(","))):
        if "=" in part:
            current, _, value = part.partition("=")
            current = current.strip()
            if current not in keys:
                raise UsageError(f"--codec {spec!r}: {family} has no key {current!r}; keys: {', '.join(keys)}")
            if current in given:
                raise UsageError(f"--codec {spec!r}: key {current!r} given twice")
            given[current] = [value.strip()]
        elif current is None:
            raise UsageError(f"--codec {spec!r}: expected key=value after {family}:")
        else:
            given[current].append(part)
    for key in REQUIRED.get(family, ()):
        if key not in given:
            raise UsageError(f"--codec {spec!r}: {family} needs {key}=… (e.g. {family}:{key}=/models/sdxl-vae)")
    values: dict[str, list[Any]] = {}
    for key, (default, parse) in keys.items():
        if key in given:
            try:
                values[key] = [parse(v) for v in given[key]]
            except ValueError as e:
                raise UsageError(f"--codec {spec!r}: {key}={','.join(given[key])}: {e}") from None
        else:
            values[key] = list(default) if isinstance(default, list) else [default]
    shown = tuple(k for k in keys if k in given or isinstance(keys[k][0], list))
    if family == "vae":  # label by name (default: the folder's name), not by path
        values["name"] = [n or Path(values["path"][0]).expanduser().name for n in values["name"]]
        shown = ("name",) if len(values["path"]) == 1 else ("path",)
    names = list(values)
    return [CodecConfig(family, dict(zip(names, combo)), shown, spec.strip())
            for combo in itertools.product(*values.values())]


def parse_specs(specs: list[str]) -> list[CodecConfig]:
    """All ``--codec`` specs expanded; labels must be unique."""
    configs = [c for s in specs for c in parse_spec(s)]
    seen: set[str] = set()
    for c in configs:
        if c.label in seen:
            raise UsageError(f"codec {c.label} is given twice; drop one --codec")
        seen.add(c.label)
    return configs


# --------------------------------------------------------------------------- running
@dataclass
class Context:
    """What codecs need from the run: weights, device, dtype, seed, and the store's latent precision."""

    weights: str | None = None
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    store: bool = False
    latent_itemsize: int = STORED_LATENT_BYTES
    cache: dict[Any, Any] = field(default_factory=dict)


@dataclass
class Output:
    """One reconstruction: ``image`` ``(3,H,W)`` uint8, the coded size, seconds, codec-specific extras."""

    image: torch.Tensor
    nbytes: int
    encode_s: float | None
    decode_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def image_seed(seed: int, image_id: str) -> int:
    """Per-image sampling seed from the run seed and the image id (independent of order, limit, resume)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "little") >> 1


def sc_latent_shape(height: int, width: int, scale: float) -> tuple[int, int, int]:
    """Shape of the Stable Cascade latent of an image of ``height``×``width`` at encoder ``scale``."""
    h, w = encoder_input_size(height, width, scale)
    return LATENT_CHANNELS, h // LATENT_STRIDE, w // LATENT_STRIDE


class BenchCodec:
    """Base class: ``prepare(ctx)`` once (load models, check settings), then ``run(item)`` per image."""

    def __init__(self, config: CodecConfig):
        self.config = config
        self.weights_info: dict[str, Any] | None = None
        self.encoder_info: dict[str, Any] | None = None  # library and version of a classical codec
        self.tiny = False

    @property
    def label(self) -> str:
        """See :attr:`CodecConfig.label`."""
        return self.config.label

    @property
    def title(self) -> str:
        """The label, marked when the weights are tiny random stand-ins."""
        return self.label + (" [TINY RANDOM WEIGHTS]" if self.tiny else "")

    def prepare(self, ctx: Context) -> None:
        """Load what the codec needs; raise a user error for impossible settings."""
        self.ctx = ctx

    def run(self, item) -> Output:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matched_latent(self, item) -> tuple[int, int]:
        """``(values, bytes)`` of the Stable Cascade latent a baseline is matched to: the stored latent on a
        store (unless ``scale=`` is given), else the float16 latent of this image at ``scale``."""
        if self.ctx.store and "scale" not in self.config.shown:
            n = int(item.latent.numel())
            return n, n * self.ctx.latent_itemsize
        c, h, w = sc_latent_shape(*item.image.shape[-2:], self.config.params["scale"])
        return c * h * w, c * h * w * STORED_LATENT_BYTES


class StableCascade(BenchCodec):
    """Encode with the EfficientNet, store the latent as float16, decode with Stage B + Stage A."""

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        p = self.config.params
        if ctx.store and {"scale", "resize"} & set(self.config.shown):
            raise UsageError(f"codec {self.label}: on a latent store the encoder scale and resize are fixed by the "
                             "store (decode-only mode); drop scale=/resize=")
        key = ("sc", p["stage_b"])
        if key not in ctx.cache:
            from codec import Codec

            size = None if p["stage_b"] == "auto" else p["stage_b"]  # auto: what the weights hold (lite first)
            ctx.cache[key] = Codec.from_pretrained(ctx.weights, stage_b=size, dtype=ctx.dtype, device=ctx.device)
        self.codec = ctx.cache[key]
        notes = sorted({c.note for c in self.codec.components.values() if c.note})
        self.tiny = any("TINY RANDOM" in n for n in notes)
        self.weights_info = {"source": self.codec.source.source, "notes": notes, "tiny_random": self.tiny,
                             **{k: v.file for k, v in self.codec.components.items()},
                             "stage_b_dtype": str(self.codec.dtype).replace("torch.", ""),
                             "precision": self.codec.dtype_reason, "device": str(self.codec.device)}

    def run(self, item) -> Output:
        p = self.config.params
        height, width = item.image.shape[-2:]
        encode_s = None
        if self.ctx.store:
            z = item.latent[None].to(torch.float16)
            nbytes = int(z.numel()) * self.ctx.latent_itemsize
        else:
            t = time.perf_counter()
            z = self.codec.encode(from_uint8(item.image[None]), scale=p["scale"], resize=p["resize"])
            z = z.to(torch.float16)
            encode_s = time.perf_counter() - t
            nbytes = int(z.numel()) * STORED_LATENT_BYTES
        t = time.perf_counter()
        x = self.codec.decode(z.float(), height=height, width=width, steps=p["steps"], cfg=p["cfg"],
                              cfg_rho=p["cfg_rho"], sampler=p["sampler"], seed=image_seed(self.ctx.seed, item.id),
                              output="tensor")
        decode_s = time.perf_counter() - t
        return Output(to_uint8(x[0]), nbytes, encode_s, decode_s, {"latent_shape": list(z.shape[1:])})


class ClassicalCodec(BenchCodec):
    """A codec of :mod:`.formats` at one fixed setting of its knob (``quality=``, or ``ratio=`` for JPEG 2000)."""

    def __init__(self, config: CodecConfig):
        super().__init__(config)
        self.format = FORMATS[config.family]

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.format.check()
        self.encoder_info = self.format.library()

    def run(self, item) -> Output:
        img = uint8_to_pil(item.image)
        t = time.perf_counter()
        data = self.format.encode(img, self.config.params[self.format.knob])
        encode_s = time.perf_counter() - t
        t = time.perf_counter()
        out = pil_to_uint8(self.format.decode(data))
        return Output(out, len(data), encode_s, time.perf_counter() - t)


class BudgetCodec(ClassicalCodec):
    """A codec of :mod:`.formats` at the setting with the largest file that fits the latent's byte budget
    (encode time includes the search)."""

    def __init__(self, config: CodecConfig):
        BenchCodec.__init__(self, config)
        self.format = FORMATS[config.family.removesuffix(BUDGET_SUFFIX)]

    def run(self, item) -> Output:
        p = self.config.params
        budget = p["bytes"] if p["bytes"] is not None else self._matched_latent(item)[1]
        img = uint8_to_pil(item.image)
        t = time.perf_counter()
        r = encode_under_budget(self.format, img, budget)
        encode_s = time.perf_counter() - t
        t = time.perf_counter()
        out = pil_to_uint8(self.format.decode(r.data))
        return Output(out, len(r.data), encode_s, time.perf_counter() - t,
                      {"budget": budget, self.format.knob: round(r.knob, 4), "over_budget": r.over_budget,
                       "encodes": r.tries})


def bicubic_size(height: int, width: int, values: int) -> tuple[int, int]:
    """The largest ``(h, w)`` with the image's aspect ratio (w rounded) and ``3·h·w ≤ values``."""
    aspect = width / height
    h = max(1, math.isqrt(int(values / 3 / aspect)))
    while h > 1 and 3 * h * max(1, round(h * aspect)) > values:
        h -= 1
    while 3 * (h + 1) * max(1, round((h + 1) * aspect)) <= values:
        h += 1
    return h, max(1, round(h * aspect))


class Bicubic(BenchCodec):
    """Bicubic down-sampling to the latent's number of values (as uint8), then bicubic up-sampling."""

    def run(self, item) -> Output:
        p = self.config.params
        height, width = item.image.shape[-2:]
        values = p["values"] if p["values"] is not None else self._matched_latent(item)[0]
        h, w = bicubic_size(height, width, values)
        img = uint8_to_pil(item.image)
        t = time.perf_counter()
        small = img.resize((w, h), Image.Resampling.BICUBIC)
        encode_s = time.perf_counter() - t
        t = time.perf_counter()
        out = pil_to_uint8(small.resize((width, height), Image.Resampling.BICUBIC))
        return Output(out, 3 * h * w, encode_s, time.perf_counter() - t, {"low_res": [h, w], "values": values})


class DiffusersVAE(BenchCodec):
    """A diffusers ``AutoencoderKL`` / ``AutoencoderDC`` from a local folder (fp32; latent stored as float16)."""

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        folder = Path(self.config.params["path"]).expanduser()
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise MissingInputError(f"{folder}: no config.json; give vae:path= a local diffusers autoencoder folder "
                                    "(config.json + diffusion_pytorch_model.safetensors)")
        kind = json.loads(config_file.read_text()).get("_class_name")
        import diffusers

        if kind not in ("AutoencoderKL", "AutoencoderDC"):
            raise UsageError(f"{config_file}: _class_name is {kind!r}; the vae codec takes AutoencoderKL or "
                             "AutoencoderDC folders")
        self.device = resolve_device(ctx.device)
        try:
            self.model = getattr(diffusers, kind).from_pretrained(str(folder), local_files_only=True)
        except (OSError, EnvironmentError) as e:
            raise MissingInputError(f"{folder}: cannot load the {kind} ({e})") from None
        self.model = self.model.to(self.device, torch.float32).eval()
        self.kind = kind
        cfg = self.model.config
        blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")
        self.stride = 2 ** (len(blocks) - 1)
        self.weights_info = {"path": str(folder), "class": kind, "stride": self.stride,
                             "latent_channels": cfg.get("latent_channels")}

    @torch.no_grad()
    def run(self, item) -> Output:
        height, width = item.image.shape[-2:]
        ph, pw = -height % self.stride, -width % self.stride
        x = item.image[None].float().div(127.5).sub(1).to(self.device)
        if ph or pw:
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
        t = time.perf_counter()
        enc = self.model.encode(x)
        z = (enc.latent_dist.mode() if self.kind == "AutoencoderKL" else enc.latent).to(torch.float16)
        encode_s = time.perf_counter() - t
        t = time.perf_counter()
        y = self.model.decode(z.float()).sample
        decode_s = time.perf_counter() - t
        out = to_uint8(((y[0, :, :height, :width].float().cpu()) + 1) / 2)
        return Output(out, int(z.numel()) * STORED_LATENT_BYTES, encode_s, decode_s,
                      {"latent_shape": list(z.shape[1:])})


CLASSES: dict[str, type[BenchCodec]] = {"sc": StableCascade, "bicubic": Bicubic, "vae": DiffusersVAE,
                                        **{name: ClassicalCodec for name in FORMATS},
                                        **{name + BUDGET_SUFFIX: BudgetCodec for name in FORMATS}}


def build(config: CodecConfig) -> BenchCodec:
    """The codec object for a config."""
    return CLASSES[config.family](config)
