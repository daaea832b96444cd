"""`decode_dataset` (behind `cascade decode-dataset`): latents decoded in fixed groups of `batch_size`, one Stage B
batch per run of one size, and a resumed run writing the images an uninterrupted one would have."""

import numpy as np
import torch
from PIL import Image


def _store(tmp_path, tiny_weights):
    from datasets_tools.encode import encode_dataset

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    for name, shape in (("a", (64, 64)), ("b", (64, 64)), ("c", (64, 64)), ("d", (96, 64)), ("e", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(src / f"{name}.png")
    encode_dataset(src, tmp_path / "s.zarr", tiny_weights, size=64, policy="keep-aspect", workers=0, progress=False)
    return tmp_path / "s.zarr"


def test_decode_dataset_batches_each_group_and_resumes_to_the_same_images(tiny_codec, tiny_weights, tmp_path):
    from datasets_tools.decode import decode_dataset

    store = _store(tmp_path, tiny_weights)
    tiny_codec.decode(torch.zeros(1, 16, 2, 2), steps=1, cfg=None)  # its one-off memory probe runs Stage B too
    batches = []
    stage_b = tiny_codec.stage_b
    hook = stage_b.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        full = decode_dataset(store, tmp_path / "full", tiny_codec, progress=False, steps=1, cfg=None, seed=0,
                              batch_size=3)
    finally:
        hook.remove()
    assert full.written == 5
    # two groups of at most 3 in store order; latents of one size within a group share one Stage B batch
    assert sum(batches) == 5 and max(batches) == 3, batches
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    # killed after the first group and part of the second: the rerun writes exactly the missing images, identical
    part = tmp_path / "part"
    part.mkdir()
    for name in ("a.png", "b.png", "c.png", "e.png"):
        (part / name).write_bytes((tmp_path / "full" / name).read_bytes())
    again = decode_dataset(store, part, tiny_codec, progress=False, steps=1, cfg=None, seed=0, batch_size=3)
    assert (again.written, again.skipped) == (1, 4)
    assert np.array_equal(np.asarray(Image.open(part / "d.png")), np.asarray(Image.open(tmp_path / "full" / "d.png")))
    # a group of one is exactly Codec.decode of that latent from the seed
    one = decode_dataset(store, tmp_path / "one", tiny_codec, progress=False, steps=1, cfg=None, seed=0, batch_size=1,
                         ids=["b"])
    assert one.written == 1
    from datasets_tools.dataset import LatentDataset

    ds = LatentDataset(store)
    z = ds[list(ds.ids).index("b")]["latent"]
    ref = tiny_codec.decode(z[None], steps=1, cfg=None, seed=0)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / "b.png")), np.asarray(ref))
    assert torch.is_tensor(z)
