"""Helper for tests/test_dataset_buckets.py, run under ``torchrun --nproc_per_node 2``: both ranks create the same
fresh bucket at the same moment, many times, then write their own rows of it.

``bucket_race_worker.py STORE N [--non-atomic-zarr]``. With ``--non-atomic-zarr`` zarr's LocalStore
writes files in place, in two halves (as zarr < 3.1.3 did, without the final rename), so that a reader
can see a half-written document: bucket creation must not depend on zarr writing atomically.
"""

from __future__ import annotations

import contextlib
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


def _non_atomic_zarr() -> None:
    import zarr.storage._local as local

    if not hasattr(local, "_atomic_write"):
        return  # another zarr layout: run against whatever it does

    class _Halves:
        def __init__(self, f):
            self.f = f

        def write(self, data) -> int:
            data = bytes(data)
            n = self.f.write(data[: len(data) // 2])
            self.f.flush()
            time.sleep(0.002)
            return n + self.f.write(data[len(data) // 2:])

    @contextlib.contextmanager
    def in_place(path, mode, exclusive=False):
        with open(path, "xb" if exclusive else "wb") as f:
            yield _Halves(f)

    local._atomic_write = in_place


def main() -> None:
    out, n = sys.argv[1], int(sys.argv[2])
    if "--non-atomic-zarr" in sys.argv:
        _non_atomic_zarr()
    from datasets_tools.encode import store_identity
    from datasets_tools.store import LatentStore

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    if rank == 0:
        identity = store_identity(Path("effnet_encoder.safetensors"), "0" * 64, "keep-aspect", 64, "float16", 2)
        LatentStore.open_for_writing(out, identity)
    dist.barrier()
    store = LatentStore.open(out, mode="r+")
    failures = []
    for i in range(n):
        dist.barrier()  # both ranks reach the creation of bucket i together
        try:
            g = store.ensure_bucket((32 * (i + 1), 32), 3)
            g["latents"][rank * 2:(rank + 1) * 2] = rank + 1  # each rank owns one shard (S = 2)
        except Exception as e:  # noqa: BLE001 - reported to the test
            failures.append(f"bucket {i}: {type(e).__name__}: {e}"[:200])
    print(f"rank {rank} failures {len(failures)}", *failures[:3], sep="\n", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
