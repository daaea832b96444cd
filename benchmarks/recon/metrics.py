"""Reconstruction metrics, the field's conventions (``../shared/reference/field.md`` §2), streamed.

Inputs are ``(3,H,W)`` uint8 tensors (reconstructions rounded to uint8 before any metric):

* **PSNR** per image over RGB, data range 255 (torchmetrics), then averaged over images.
  Identical images have infinite PSNR; it is capped at :data:`PSNR_CAP` dB so means and
  JSON stay finite (an MSE below 255²·10⁻¹⁰ reports the cap).
* **SSIM** (torchmetrics): Gaussian window 11 px, σ 1.5, on RGB (mean over channels), data
  range 255, K1 0.01, K2 0.03.
* **MS-SSIM** (torchmetrics): the same window, 5 scales with the standard weights; needs a
  side of at least 161 px.
* **LPIPS** v0.1 (``lpips`` package), AlexNet by default or VGG16, on images mapped to [-1, 1].
* **rFID**: Inception-v3 pool3 (2048-d, torch-fidelity's port of the TF 2015-12-05 weights,
  input resized to 299 with antialiased bilinear as torchmetrics does) of the
  reconstructions against the originals of the same set; Fréchet distance by torchmetrics.

LPIPS and rFID need ImageNet-trained backbones. They are looked up in a file given by the
user, then in the torch hub cache (``$TORCH_HOME/hub/checkpoints``, default
``~/.cache/torch/hub/checkpoints``) under their usual names; nothing is downloaded here.
A metric whose backbone is absent is reported as unavailable with the file to put where,
and the run goes on with the others.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codec.errors import CascadeError, MissingInputError, UsageError

PSNR_CAP = 100.0
SSIM_KW = dict(gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=255.0, k1=0.01, k2=0.03)
MS_SSIM_MIN_SIDE = 161  # (11 - 1) · 2⁴ + 1: the window must fit at the coarsest of 5 scales
FID_FEATURES = 2048
LPIPS_NETS = ("alex", "vgg")


class MetricUnavailable(CascadeError):
    """A metric cannot be computed here; the message says why and what file to put where."""


@dataclass
class MetricStatus:
    """Whether a metric is computed, and the backbone file or the reason it is not."""

    name: str
    available: bool
    detail: str = ""
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the summary."""
        return {"available": self.available, "detail": self.detail, "message": self.message}


def _float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
        raise UsageError(f"metrics take (3,H,W) uint8 images, got {x.dtype} {list(x.shape)}")
    # Same values in a fresh channels-last tensor: the depthwise Gaussian convolutions of (MS-)SSIM run ~3× faster
    # than NCHW on CPU, and views of HWC arrays (strides that only look channels-last) are slower still.
    out = torch.empty((1, *x.shape), dtype=torch.float32, memory_format=torch.channels_last)
    return out.copy_(x[None])


def psnr(recon: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of two ``(3,H,W)`` uint8 images (data range 255), capped at :data:`PSNR_CAP`."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = peak_signal_noise_ratio(_float(recon), _float(ref), data_range=255.0, reduction="none", dim=(1, 2, 3))
    return min(PSNR_CAP, float(value.item()))


def ssim(recon: torch.Tensor, ref: torch.Tensor) -> float:
    """SSIM of two ``(3,H,W)`` uint8 images: Gaussian 11 px, σ 1.5, data range 255, mean over RGB."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(_float(recon), _float(ref), **SSIM_KW).item())


def ms_ssim(recon: torch.Tensor, ref: torch.Tensor) -> float | None:
    """MS-SSIM (5 scales, same window as :func:`ssim`); ``None`` when a side is under 161 px."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    if min(ref.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return None
    return float(multiscale_structural_similarity_index_measure(_float(recon), _float(ref), **SSIM_KW).item())


# --------------------------------------------------------------------------- backbone files
def hub_checkpoints() -> Path:
    """The torch hub checkpoint folder torchvision and torch-fidelity download into (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_weights(net: str):
    from torchvision import models

    return {"alex": models.AlexNet_Weights.IMAGENET1K_V1, "vgg": models.VGG16_Weights.IMAGENET1K_V1}[net]


def lpips_backbone_file(net: str) -> tuple[str, str]:
    """``(file name, URL)`` of the ImageNet backbone LPIPS-``net`` needs (torchvision's)."""
    url = _torchvision_weights(net).url
    return url.rsplit("/", 1)[-1], url


def fid_backbone_file() -> tuple[str, str]:
    """``(file name, URL)`` of torch-fidelity's Inception-v3 port (the FID reference weights)."""
    url = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
           "weights-inception-2015-12-05-6726825d.pth")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        url = URL_INCEPTION_V3
    except ImportError:
        pass
    return url.rsplit("/", 1)[-1], url


def _find(given: str | os.PathLike | None, name: str, url: str, what: str, option: str) -> Path:
    """The backbone file: ``given`` (must exist), else the hub cache; :class:`MetricUnavailable` otherwise."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise MissingInputError(f"{path}: no such file (given with {option}); put the {what} file there "
                                    f"({name}, from {url}) or leave out {option}")
        return path
    cached = hub_checkpoints() / name
    if cached.is_file():
        return cached
    raise MetricUnavailable(f"not computed: the {what} file {name} is not on this machine. Download {url} into "
                            f"{hub_checkpoints()}/ (the torch hub cache), or pass {option} FILE.")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a plain ``.pth`` state dict (read with ``weights_only=True``:
    no code in the file runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a plain state dict
        raise UsageError(f"{path}: not a plain PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UsageError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


# --------------------------------------------------------------------------- LPIPS
class LPIPSMetric:
    """LPIPS v0.1 with an AlexNet or VGG16 trunk; ``__call__(recon, ref)`` on ``(3,H,W)`` uint8 images.

    ``weights``: a backbone file (torchvision's ImageNet state dict) or ``None`` to use the
    torch hub cache. ``random_trunk=True`` keeps a randomly initialised trunk of the right
    architecture instead (tests only: scores are meaningless). The linear calibration heads
    ship with the ``lpips`` package.
    """

    def __init__(self, net: str = "alex", weights: str | os.PathLike | None = None, device: str = "cpu",
                 random_trunk: bool = False):
        import lpips
        from torchvision import models

        if net not in LPIPS_NETS:
            raise UsageError(f"LPIPS net must be one of {', '.join(LPIPS_NETS)}, got {net!r}")
        self.net, self.device = net, device
        name, url = lpips_backbone_file(net)
        path = None if random_trunk else _find(weights, name, url, f"LPIPS-{net} trunk (ImageNet weights)",
                                               "--lpips-weights")
        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        if path is not None:
            # Only the convolutional `features` of torchvision's model are used (the classifier may be absent).
            trunk = {"alex": models.alexnet, "vgg": models.vgg16}[net](weights=None).features
            sd = {k[len("features."):]: v for k, v in load_state_dict(path).items() if k.startswith("features.")}
            try:
                trunk.load_state_dict(sd)
            except RuntimeError as e:
                raise UsageError(f"{path}: not torchvision's {net} ImageNet weights ({str(e).splitlines()[-1].strip()})"
                                 ) from None
            features = trunk.state_dict()
            # lpips slices torchvision's `features` into slice1…sliceK keeping the module indices.
            mapped = {k: features[k.split(".", 1)[1]] for k in self.model.net.state_dict()}
            self.model.net.load_state_dict(mapped)
        self.model.eval().to(device)
        self.source = "RANDOM trunk (tests only)" if path is None else str(path)

    @torch.no_grad()
    def __call__(self, recon: torch.Tensor, ref: torch.Tensor) -> float:
        """LPIPS distance of two ``(3,H,W)`` uint8 images (mapped to [-1, 1])."""
        a = _float(recon).to(self.device) / 127.5 - 1
        b = _float(ref).to(self.device) / 127.5 - 1
        return float(self.model(a, b).item())


def lpips_metric(net: str, weights: str | os.PathLike | None, enabled: bool = True,
                 device: str = "cpu") -> tuple[LPIPSMetric | None, MetricStatus]:
    """The LPIPS metric and its status; ``(None, unavailable status)`` when disabled or its backbone is absent."""
    name = f"lpips_{net}"
    if not enabled:
        return None, MetricStatus(name, False, message="LPIPS not computed: disabled with --no-lpips")
    try:
        m = LPIPSMetric(net, weights, device)
    except MetricUnavailable as e:
        return None, MetricStatus(name, False, message=f"LPIPS-{net} {e}")  # e: "not computed: …"
    return m, MetricStatus(name, True, detail=f"lpips 0.1, {net} trunk from {m.source}")


# --------------------------------------------------------------------------- rFID
class _Precomputed(torch.nn.Module):
    """Pass-through "feature extractor": features are computed once per image and given to every FID."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def inception_extractor(weights: str | os.PathLike | None) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (pool3, 2048-d) with weights from ``weights`` or the hub cache.

    Takes ``(B,3,H,W)`` uint8, returns ``(B,2048)``. :class:`MetricUnavailable` when the file
    or torch-fidelity is missing.
    """
    name, url = fid_backbone_file()
    path = _find(weights, name, url, "FID Inception-v3", "--fid-weights")
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:
        raise MetricUnavailable("not computed: torch-fidelity (Inception-v3 architecture) is not installed; "
                                "pip install torch-fidelity") from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    load_state_dict(path)  # refuses files that would run code when unpickled, before torch-fidelity reads it
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FID_FEATURES)],
                              feature_extractor_weights_path=str(path))


@dataclass
class FIDAccumulator:
    """rFID of each codec against the originals, streamed: one torchmetrics FID per codec label.

    ``extractor`` maps ``(B,3,H,W)`` uint8 to ``(B,D)`` features (the Inception-v3 pool3, or any
    module with that contract, e.g. a random Inception for tests). The originals' features are
    computed once per image and added to every codec's FID; memory is fixed by D and the
    number of codecs, not by the number of images.
    """

    extractor: torch.nn.Module
    labels: list[str]
    device: str = "cpu"
    fids: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.extractor = self.extractor.eval().to(self.device)
        dim = getattr(self.extractor, "num_features", None) or \
            self._features(torch.zeros(1, 3, 299, 299, dtype=torch.uint8)).shape[-1]
        for label in self.labels:
            fid = FrechetInceptionDistance(feature=_Precomputed(dim), reset_real_features=False)
            fid.persistent(True)
            self.fids[label] = fid

    @torch.no_grad()
    def _features(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 3:
            image = image[None]
        return self.extractor(image.to(self.device)).reshape(image.shape[0], -1).float().cpu()

    def add_original(self, image: torch.Tensor) -> None:
        """Add one original ``(3,H,W)`` uint8 to the reference statistics of every codec."""
        f = self._features(image)
        for fid in self.fids.values():
            fid.update(f, real=True)

    def add_reconstruction(self, label: str, image: torch.Tensor) -> None:
        """Add one reconstruction of codec ``label``."""
        self.fids[label].update(self._features(image), real=False)

    def compute(self, label: str) -> tuple[float | None, str]:
        """``(rFID, "")``, or ``(None, reason)`` with fewer than 2 images."""
        fid = self.fids[label]
        if int(fid.fake_features_num_samples) < 2:
            return None, "not computed: rFID needs at least 2 images"
        fid.orig_dtype = torch.float32
        return float(fid.compute().item()), ""

    def state_dict(self) -> dict[str, Any]:
        """Accumulated statistics (for resuming)."""
        return {label: fid.state_dict() for label, fid in self.fids.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for label, fid in self.fids.items():
            fid.load_state_dict(state[label])


def fid_metric(weights: str | os.PathLike | None, labels: list[str], enabled: bool = True, device: str = "cpu",
               extractor: torch.nn.Module | None = None) -> tuple[FIDAccumulator | None, MetricStatus]:
    """The rFID accumulator and its status (``extractor`` overrides the Inception file, e.g. in tests)."""
    if not enabled:
        return None, MetricStatus("rfid", False, message="rFID not computed: disabled with --no-fid")
    if extractor is None:
        try:
            extractor = inception_extractor(weights)
        except MetricUnavailable as e:
            return None, MetricStatus("rfid", False, message=f"rFID {e}")
        detail = f"Inception-v3 pool3 2048-d (torch-fidelity port of TF 2015-12-05) from " \
                 f"{weights or hub_checkpoints() / fid_backbone_file()[0]}"
    else:
        detail = f"custom feature extractor {type(extractor).__name__} (not the reference Inception weights)"
    return FIDAccumulator(extractor, labels, device), MetricStatus("rfid", True, detail=detail)
