"""Training log: one JSON object per line in ``{output_dir}/log.jsonl``, and a console line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

LOG_FILE = "log.jsonl"


class JsonlLog:
    """Appends records; on resume, drops the records a killed run wrote after its last checkpoint."""

    def __init__(self, output_dir: str | os.PathLike, resume_step: int | None,
                 echo: Callable[[str], None] | None = print):
        self.path = Path(output_dir) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` and print it compactly."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.echo is not None:
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "event")
            self.echo(shown)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_log(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's log."""
    path = Path(output_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
