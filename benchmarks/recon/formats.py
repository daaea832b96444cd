"""Classical image codecs behind one interface, and the one byte-budget search they all share.

Each codec is a small :class:`ImageFormat` (as CompressAI's ``PillowCodec`` subclasses are):
its encoder library and version, the knob that trades size for quality (its range, whether
it takes fractions, which way file size moves with it), the fixed settings of its rate–quality
sweep, ``encode(img, knob) -> bytes`` and ``decode(bytes) -> image``. :func:`encode_under_budget`
finds, for any of them, the setting with the largest file that fits a byte budget.

* ``jpeg`` — libjpeg(-turbo) through Pillow; fractional quality (see :mod:`.jpeg`).
* ``webp`` — libwebp through Pillow; quality is a float in libwebp's API, so fractions work.
* ``avif`` — libavif (aom encoder) through Pillow; integer quality: libavif maps 0–100 onto
  aom's 64 quantisers, so sizes come in steps (a budget is met to within one step, ~5–8 %).
* ``jxl`` — libjxl through ``imagecodecs`` (the ``jxl`` extra); fractional quality (libjxl's
  own quality → Butteraugli distance mapping). imagecodecs was chosen over
  pillow-jxl-plugin because it is maintained alongside tifffile/zarr, ships libjxl in its
  wheels, reports the libjxl version, and takes arrays without registering a Pillow plugin.
* ``jpeg2000`` — OpenJPEG through Pillow; the knob is the compression ratio (OpenJPEG's
  rate allocation), fractional; the file shrinks as the ratio grows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image, features

from codec.errors import UsageError

from . import jpeg

SEARCH_STEPS = 24


class ImageFormat:
    """One classical codec: encode a PIL RGB image at a knob setting, decode bytes back, name its library."""

    name: ClassVar[str]
    knob: ClassVar[str] = "quality"
    knob_range: ClassVar[tuple[float, float]] = (1.0, 100.0)
    integer_knob: ClassVar[bool] = False
    size_grows_with_knob: ClassVar[bool] = True
    sweep: ClassVar[tuple[float, ...]] = (10, 25, 50, 75, 90)

    def missing(self) -> str | None:
        """Why this codec cannot run here (a sentence naming the fix), or None when it can."""
        return None

    def library(self) -> dict[str, str | None]:
        """The encoder library, its version, and the Python package that calls it (with its version)."""
        raise NotImplementedError

    def encode(self, img: Image.Image, knob: float) -> bytes:
        """The file of ``img`` at setting ``knob``."""
        raise NotImplementedError

    def decode(self, data: bytes) -> Image.Image:
        """The RGB image in ``data``."""
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")

    def check(self) -> None:
        """Raise a user error when the codec is missing here."""
        why = self.missing()
        if why:
            raise UsageError(why)


def _pillow(feature: str, library: str) -> dict[str, str | None]:
    import PIL

    return {"library": library, "version": features.version(feature), "via": f"Pillow {PIL.__version__}"}


class PillowFormat(ImageFormat):
    """A codec Pillow writes: ``pil_format`` with ``options`` and the knob passed as ``knob_option``."""

    pil_format: ClassVar[str]
    feature: ClassVar[str]
    library_name: ClassVar[str]
    knob_option: ClassVar[str] = "quality"
    options: ClassVar[dict] = {}

    def missing(self) -> str | None:
        """See :meth:`ImageFormat.missing`."""
        if features.check(self.feature):
            return None
        return (f"codec {self.name}: this Pillow was built without {self.library_name}; install a Pillow wheel from "
                "PyPI (pip install --force-reinstall pillow), which includes it")

    def library(self) -> dict[str, str | None]:
        """See :meth:`ImageFormat.library`."""
        return _pillow(self.feature, self.library_name)

    def encode(self, img: Image.Image, knob: float) -> bytes:
        """See :meth:`ImageFormat.encode`."""
        buf = io.BytesIO()
        img.save(buf, self.pil_format, **{**self.options, self.knob_option: self._knob_value(knob)})
        return buf.getvalue()

    def _knob_value(self, knob: float):
        return int(knob) if self.integer_knob else float(knob)


class JpegFormat(ImageFormat):
    """JPEG (libjpeg-turbo through Pillow), fractional quality by scaled quantisation tables."""

    name = "jpeg"

    def library(self) -> dict[str, str | None]:
        """See :meth:`ImageFormat.library`."""
        lib = "libjpeg-turbo" if features.check("libjpeg_turbo") else "libjpeg"
        return _pillow("libjpeg_turbo" if lib == "libjpeg-turbo" else "jpg", lib)

    def encode(self, img: Image.Image, knob: float) -> bytes:
        """See :meth:`ImageFormat.encode`."""
        return jpeg.encode(img, knob)


class WebpFormat(PillowFormat):
    """WebP (libwebp), lossy, default method 4."""

    name, pil_format, feature, library_name = "webp", "WEBP", "webp", "libwebp"
    knob_range = (0.0, 100.0)


class AvifFormat(PillowFormat):
    """AVIF (libavif with aom), 4:2:0, default speed; integer quality."""

    name, pil_format, feature, library_name = "avif", "AVIF", "avif", "libavif"
    knob_range = (0.0, 100.0)
    integer_knob = True
    options = {"subsampling": "4:2:0"}

    def library(self) -> dict[str, str | None]:
        """See :meth:`ImageFormat.library`; adds the AV1 encoder libavif uses."""
        info = super().library()
        try:
            from PIL import _avif

            info["codecs"] = _avif.codec_versions()
        except ImportError:  # no AVIF in this Pillow: missing() says so
            pass
        return info


class Jpeg2000Format(PillowFormat):
    """JPEG 2000 (OpenJPEG), one quality layer at a compression ratio, 5 resolution levels (Pillow's default)."""

    name, pil_format, feature, library_name = "jpeg2000", "JPEG2000", "jpg_2000", "OpenJPEG"
    knob, knob_option = "ratio", "quality_layers"
    knob_range = (2.0, 4000.0)  # a ratio of 1 would mean lossless to OpenJPEG
    size_grows_with_knob = False
    sweep = (400, 200, 100, 50, 20)
    options = {"quality_mode": "rates"}

    def _knob_value(self, knob: float):
        return [float(knob)]


class JxlFormat(ImageFormat):
    """JPEG XL (libjxl through imagecodecs), lossy VarDCT, default effort; fractional quality."""

    name = "jxl"
    knob_range = (0.0, 99.0)  # libjxl: quality 0 is its largest distance (25); 100 would be distance 0 (lossless)

    def missing(self) -> str | None:
        """See :meth:`ImageFormat.missing`."""
        try:
            import imagecodecs
        except ImportError:
            return ("codec jxl needs the imagecodecs package (libjxl); install it with "
                    "pip install 'cascade-codec[jxl]' (or pip install imagecodecs)")
        if not imagecodecs.JPEGXL.available:
            return f"codec jxl: imagecodecs {imagecodecs.__version__} was built without libjxl; pip install imagecodecs"
        return None

    def library(self) -> dict[str, str | None]:
        """See :meth:`ImageFormat.library`."""
        if self.missing():
            return {"library": "libjxl", "version": None, "via": None}
        import imagecodecs

        return {"library": "libjxl", "version": imagecodecs.jpegxl_version().removeprefix("libjxl "),
                "via": f"imagecodecs {imagecodecs.__version__}"}

    def encode(self, img: Image.Image, knob: float) -> bytes:
        """See :meth:`ImageFormat.encode`."""
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(np.asarray(img.convert("RGB")), level=float(knob)))

    def decode(self, data: bytes) -> Image.Image:
        """See :meth:`ImageFormat.decode`."""
        import imagecodecs

        return Image.fromarray(imagecodecs.jpegxl_decode(data)).convert("RGB")


FORMATS: dict[str, ImageFormat] = {f.name: f for f in (JpegFormat(), WebpFormat(), AvifFormat(), JxlFormat(),
                                                         Jpeg2000Format())}


@dataclass
class BudgetResult:
    """The file found for a byte budget: its bytes, the knob setting, whether even the smallest setting was over
    budget, and how many encodes the search took."""

    data: bytes
    knob: float
    over_budget: bool
    tries: int


def encode_under_budget(fmt: ImageFormat, img: Image.Image, budget: int, steps: int = SEARCH_STEPS) -> BudgetResult:
    """The setting of ``fmt``'s knob with the largest file that fits in ``budget`` bytes, by bisection.

    File size moves with the knob almost monotonically, so bisection over the knob's range finds
    the best fitting setting to within ``range/2**steps`` (to the integer for integer knobs).
    When even the smallest-file setting does not fit, that file is returned with
    ``over_budget=True`` (its true size is what gets reported).
    """
    lo_knob, hi_knob = fmt.knob_range
    small, large = (lo_knob, hi_knob) if fmt.size_grows_with_knob else (hi_knob, lo_knob)
    best = fmt.encode(img, small)
    if len(best) > budget:
        return BudgetResult(best, small, True, 1)
    top = fmt.encode(img, large)
    if len(top) <= budget:
        return BudgetResult(top, large, False, 2)
    fits, over, best_knob, tries = small, large, small, 2  # invariant: `fits` fits, `over` does not
    for _ in range(steps):
        if fmt.integer_knob and abs(over - fits) <= 1:
            break
        mid = (fits + over) / 2
        if fmt.integer_knob:
            mid = float(int(mid) if fmt.size_grows_with_knob else -int(-mid))  # strictly between the two
        data = fmt.encode(img, mid)
        tries += 1
        if len(data) <= budget:
            fits = mid
            if len(data) >= len(best):
                best, best_knob = data, mid
        else:
            over = mid
    return BudgetResult(best, best_knob, False, tries)
