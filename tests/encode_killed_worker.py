"""Helper for tests/test_dataset_resume.py, run as a subprocess: an ``encode-dataset`` job that stops at a named point.

``encode_killed_worker.py POINT SOURCE OUT WEIGHTS [--text-encoder DIR] [--stage-a]`` encodes with the settings of
the test's ``cascade encode-dataset`` command. When the store reaches ``POINT`` (a name passed to the store's hook:
"plan unit 4", "capacity", "write unit 3", "commit unit 0", "finalise index", …) it prints ``paused at POINT`` on
stderr and blocks until the test kills it with SIGKILL, so the kill lands at exactly that point, whatever the
machine's speed. A job that ends without reaching ``POINT`` exits with status 3.
"""

from __future__ import annotations

import sys
import threading

from datasets_tools import encode_dataset


def main() -> None:
    """Encode until ``POINT``, then wait to be killed."""
    point, source, out, weights, *rest = sys.argv[1:]
    text_encoder = rest[rest.index("--text-encoder") + 1] if "--text-encoder" in rest else None

    def hook(name: str) -> None:
        if name == point:
            print(f"paused at {name}", file=sys.stderr, flush=True)
            threading.Event().wait()  # forever: only SIGKILL ends this process

    encode_dataset(source, out, weights, size=64, batch_size=2, workers=1, shard_size=3, progress=False,
                   log=lambda s: None, text_encoder=text_encoder, stage_a="--stage-a" in rest, hook=hook)
    sys.exit(3)


if __name__ == "__main__":
    main()
