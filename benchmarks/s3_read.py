"""Training reads of a latent store on an S3-compatible server: samples per second and bytes fetched per sample.

``python -m benchmarks.s3_read [--count 8192] [--size 768] [--shard-size 256] [--seconds 6]``

Starts a local moto S3 server (another process, as ``tests/test_dataset_s3.py`` does in-process), writes
a store of ``--count`` random float16 latents to it (the store API, as ``benchmarks.dataset``), and reads
it with a ``DataLoader`` of 0, 2 and 4 workers, batches of ``--batch-size``:

* ``plain``: ``LatentDataset(url)`` + ``BucketBatchSampler`` (random order; zarr, two requests per sample);
* ``shard``: ``LatentDataset(url, shard_cache=2)`` + ``ShardBatchSampler`` (shuffled shards, one GET each).

and, for reference, the same store on the local disk read by the plain path. Each setting runs for about
``--seconds`` (at most one epoch). Bytes per sample are counted at the S3 client (every worker's reads).
A local server has no network latency or bandwidth limit: a real object store is slower per request,
which favours the shard path further.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.dataset import write_random_store
from benchmarks.environment import cpu_info
from datasets_tools import BucketBatchSampler, LatentDataset, ShardBatchSampler

BUCKET = "bench"


def start_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free local port, and its endpoint URL (environment set so clients reach it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Its own process: in this one it would compete for the GIL with the reader.
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the moto server did not start")


def count_fetched_bytes() -> Any:
    """Count the bytes every S3 read returns, in this process and in forked DataLoader workers."""
    import s3fs

    total = multiprocessing.Value("q", 0)
    original = s3fs.S3FileSystem._cat_file

    async def counted(self, path, *args, **kwargs):
        data = await original(self, path, *args, **kwargs)
        with total.get_lock():
            total.value += len(data)
        return data

    s3fs.S3FileSystem._cat_file = counted
    return total


def read_rate(dataset: LatentDataset, sampler: Any, workers: int, seconds: float, fetched: Any) -> dict[str, float]:
    """Samples per second and bytes fetched per sample over about ``seconds`` (first batch not timed)."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         persistent_workers=False, multiprocessing_context="fork" if workers else None)
    it = iter(loader)
    next(it)
    start_bytes, n, t0 = fetched.value, 0, time.perf_counter()
    for batch in it:
        n += len(batch["id"])
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    del it
    return {"rate": n / dt, "bytes": (fetched.value - start_bytes) / max(n, 1), "samples": n}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=8192)
    ap.add_argument("--size", type=int, default=768, help="Encoder input size (768 → 16×24×24 latents).")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    args = ap.parse_args(argv)
    proc, endpoint = start_server()
    try:
        import s3fs

        fetched = count_fetched_bytes()  # before any client exists: fsspec binds the method per instance
        s3fs.S3FileSystem(anon=False).mkdir(BUCKET)
        url = f"s3://{BUCKET}/lat.zarr"
        t = write_random_store(url, args.count, args.size, args.shard_size, seed=0)
        cpu = cpu_info()
        print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs); torch {torch.__version__}")
        print(f"store: {args.count} random float16 latents 16×{args.size // 32}×{args.size // 32}, shards of "
              f"{args.shard_size}, on a local moto S3 server (written in {t:.1f} s); batches of {args.batch_size}")
        print(f"{'reader':<44} {'workers':>7} {'samples/s':>10} {'bytes/sample':>13}")
        rows = []
        for workers in args.workers:
            plain = LatentDataset(url, with_captions=False)
            rows.append(("plain: LatentDataset + BucketBatchSampler", workers,
                         read_rate(plain, BucketBatchSampler(plain, args.batch_size), workers, args.seconds, fetched)))
            cached = LatentDataset(url, with_captions=False, shard_cache=2)
            rows.append(("shard: shard_cache=2 + ShardBatchSampler", workers,
                         read_rate(cached, ShardBatchSampler(cached, args.batch_size, num_workers=workers), workers,
                                   args.seconds, fetched)))
            for name, w, r in rows[-2:]:
                print(f"{name:<44} {w:>7} {r['rate']:>10,.0f} {r['bytes']:>13,.0f}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "lat.zarr"
            write_random_store(str(local), args.count, args.size, args.shard_size, seed=0)
            ds = LatentDataset(local, with_captions=False)
            r = read_rate(ds, BucketBatchSampler(ds, args.batch_size), 0, args.seconds, fetched)
            print(f"{'local disk: LatentDataset (pread)':<44} {0:>7} {r['rate']:>10,.0f} {'-':>13}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
