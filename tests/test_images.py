"""Image input edge cases: modes, bit depths, EXIF orientation, unreadable files."""

import numpy as np
import pytest
import torch
from PIL import Image

from codec.images import (ImageReadError, from_uint8, load_image, pil_to_tensor, pil_to_uint8, to_pil, to_tensor_list,
                          to_uint8, uint8_to_pil)


def _gradient(w=40, h=30):
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 128.0)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(_gradient())
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        path = tmp_path / "img16.png"
    else:
        img = rgb.convert(mode)
        path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":  # 16-bit is scaled, not clipped to white
        ref = np.asarray(rgb.convert("L"), dtype=np.int32)
        assert np.abs(np.asarray(out)[..., 0].astype(np.int32) - ref).max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((10, 10, 4), np.uint8)
    arr[..., 0] = 200
    arr[:5, :, 3] = 255
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert (out[:5, :, 0] == 200).all() and (out[5:] == 255).all()


RED, GREEN, GREY = (255, 0, 0), (0, 255, 0), (128, 128, 128)
# EXIF orientation → the displayed corners of the stored top-left (red) and top-right (green) corners: where
# the stored 0th row and 0th column go (EXIF 2.32, tag 0x0112). 5–8 swap width and height.
ORIENTATIONS = {1: ("TL", "TR"), 2: ("TR", "TL"), 3: ("BR", "BL"), 4: ("BL", "BR"),
                5: ("TL", "BL"), 6: ("TR", "BR"), 7: ("BR", "TR"), 8: ("BL", "TL")}


def _marked(w: int = 48, h: int = 32, block: int = 16) -> Image.Image:
    """Grey, with a red block in the stored top-left corner and a green one in the top-right (JPEG-block aligned)."""
    arr = np.full((h, w, 3), GREY, np.uint8)
    arr[:block, :block] = RED
    arr[:block, -block:] = GREEN
    return Image.fromarray(arr)


def _corners(img: Image.Image, block: int = 16) -> dict[str, tuple[int, ...]]:
    """Mean colour of the centre 8×8 of each corner block (away from JPEG's ringing at the edges)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w = arr.shape[:2]
    c = (block - 8) // 2
    tops = {"T": c, "B": h - block + c}
    lefts = {"L": c, "R": w - block + c}
    return {v + u: tuple(int(round(x)) for x in arr[tops[v]:tops[v] + 8, lefts[u]:lefts[u] + 8].mean(axis=(0, 1)))
            for v in "TB" for u in "LR"}


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_puts_each_corner_where_it_is_displayed(tmp_path, fmt, orientation):
    from datasets_tools.encode import decode_image

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{fmt}"
    _marked().save(path, exif=exif.tobytes(), **({"quality": 95} if fmt == "jpg" else {}))
    red, green = ORIENTATIONS[orientation]
    expected = {corner: RED if corner == red else GREEN if corner == green else GREY
                for corner in ("TL", "TR", "BL", "BR")}
    size = (48, 32) if orientation <= 4 else (32, 48)
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation and raw.size == (48, 32)  # stored as written
        from_pil = to_pil(to_tensor_list(raw)[0])[0]
    loaded = {"path": load_image(path), "bytes": load_image(path.read_bytes()), "PIL image": from_pil,
              "dataset decoder": to_pil(decode_image(path.read_bytes()))[0]}
    for how, img in loaded.items():
        assert img.size == size, how
        got = _corners(img)
        for corner, colour in expected.items():
            assert np.abs(np.subtract(got[corner], colour)).max() <= 24, (how, corner, got[corner], colour)


def _truncated_png() -> bytes:
    import io

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"not an image at all", "not an image"),
                                             (_truncated_png(), "unreadable image")])
def test_unreadable_files_name_the_file(tmp_path, content, reason):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken.png") as e:
        load_image(path)
    assert e.value.reason.startswith(reason)
    with pytest.raises(ImageReadError, match="in-memory") as e:
        load_image(content, name="in-memory")
    assert e.value.reason.startswith(reason)


def test_decompression_bomb_is_refused(tmp_path):
    import struct as st
    import zlib

    def chunk(kind, data):
        return st.pack(">I", len(data)) + kind + data + st.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", st.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    with pytest.raises(ImageReadError) as e:
        load_image(png, name="bomb.png")
    assert e.value.reason.startswith("too large")


def test_truncated_jpeg_names_the_file(tmp_path):
    Image.fromarray(_gradient(200, 200)).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="t.jpg"):
        load_image(tmp_path / "t.jpg")


def test_array_inputs():
    hwc = _gradient()
    a = to_tensor_list(hwc)[0]
    b = to_tensor_list(torch.from_numpy(hwc).permute(2, 0, 1).float() / 255)[0]
    assert a.shape == (3, 30, 40) and torch.allclose(a, b)
    gray = to_tensor_list(np.zeros((2, 30, 40, 1), np.uint8))
    assert len(gray) == 2 and gray[0].shape == (3, 30, 40)
    with pytest.raises(ValueError, match="NaN"):
        to_tensor_list(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="channels"):
        to_tensor_list(torch.zeros(1, 5, 8, 8))
    with pytest.raises(TypeError, match="cannot use"):
        to_tensor_list([3.5])


def test_to_pil_rounds():
    img = to_pil(torch.full((3, 2, 2), 0.5))[0]
    assert np.asarray(img)[0, 0, 0] == 128


def test_uint8_pil_round_trip_keeps_every_value():
    x = torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    img = uint8_to_pil(x)
    assert img.mode == "RGB" and img.size == (5, 7)
    assert np.array_equal(np.asarray(img), x.permute(1, 2, 0).numpy())
    assert torch.equal(pil_to_uint8(img), x)
    assert torch.equal(pil_to_uint8(img.convert("L")), pil_to_uint8(img.convert("L").convert("RGB")))
    assert torch.equal(to_uint8(from_uint8(x)), x)
    assert torch.equal(from_uint8(x), x.float() / 255) and torch.equal(pil_to_tensor(img), from_uint8(x))
    with pytest.raises(ValueError, match="uint8"):
        uint8_to_pil(x.float())
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(x.float())
