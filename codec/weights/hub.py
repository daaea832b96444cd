"""The one Hugging Face hub client: files and folders of a repo from the local cache, or downloaded once;
an offline machine fails at once with a sentence naming what to download where."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import WeightsError
from .names import BUILTIN_MODELS, OFFICIAL_REPO


def builtin_missing_message(name: str, files: list[str]) -> str:
    """What the built-in model ``name`` does not have, and where the official weights that do go (never into the
    package's own folder)."""
    held = sorted(p.name for p in BUILTIN_MODELS[name].folder.glob("*.safetensors"))
    return (f"the built-in {name!r} model has no {', '.join(files)}: it holds only {', '.join(held)} (a small codec: "
            f"encode, decode, reconstruct). For this, use the official Stable Cascade weights: download "
            f"{', '.join(files)} from https://huggingface.co/{OFFICIAL_REPO} into a folder of your own (e.g. "
            f"`hf download {OFFICIAL_REPO} {' '.join(files)} --local-dir ~/stable-cascade`) and pass it with "
            "--weights DIR (Python: the folder instead of \"mini\").")


def missing_files_message(folder: Path | str, files: list[str], repo_id: str = OFFICIAL_REPO) -> str:
    """A sentence naming which official files to download and where to put them."""
    urls = "\n".join(f"  https://huggingface.co/{repo_id}/resolve/main/{name}" for name in files)
    return (f"{folder} is missing {', '.join(files)}.\n"
            f"Download these files into {folder}/ :\n{urls}\n"
            f"for example with: hf download {repo_id} {' '.join(files)} --local-dir {folder}\n"
            "(they are the official Stable Cascade weights, under the Stability AI non-commercial research "
            "community licence; on a machine with internet access you can pass the repo id instead of a folder).")


def hub_unreachable_message(repo_id: str, files: list[str], reason: str) -> str:
    return (f"cannot get {', '.join(files)} of the Hugging Face repo {repo_id}: {reason}.\n"
            f"On a machine with internet access run: hf download {repo_id} {' '.join(files)} --local-dir DIR\n"
            "then copy DIR here and pass it instead of the repo id (--weights DIR).")


def hub_offline() -> bool:
    """Whether the user asked huggingface_hub to stay offline (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 5.0) -> str | None:
    """``None`` if the Hugging Face endpoint accepts a TCP connection within ``timeout`` s, else the reason.

    huggingface_hub retries a failing request for about 30 s; probing first makes an
    offline machine fail at once.
    """
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host} is not reachable ({e.strerror or e})"


def hub_file(repo_id: str, filename: str) -> Path:
    """A file of a Hugging Face repo from the local cache, or downloaded; fails fast offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if hub_offline():
        raise WeightsError(hub_unreachable_message(repo_id, [filename],
                                                    "it is not in the local cache and HF_HUB_OFFLINE is set"))
    reason = hub_reachable()
    if reason is not None:
        raise WeightsError(hub_unreachable_message(repo_id, [filename], f"it is not in the local cache and {reason}"))
    try:
        return Path(hf_hub_download(repo_id, filename, etag_timeout=10))
    except Exception as e:  # noqa: BLE001 - network and hub errors all end the same way for the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise WeightsError(hub_unreachable_message(repo_id, [filename], f"{type(e).__name__}: {first}")) from None


def hf_subfolders(source: str | os.PathLike, subfolders: Sequence[str], what: str) -> Path:
    """The root holding ``subfolders`` (Hugging Face repo layout): a local folder, or a repo id from the
    local cache, or downloaded once. Raises :class:`WeightsError` naming what to download where."""
    path = Path(source).expanduser()
    for name, model in BUILTIN_MODELS.items():
        if str(source) == name or (path.is_dir() and path.resolve() == model.folder):
            raise WeightsError(builtin_missing_message(name, [f"{d}/" for d in subfolders]))
    hint = " ".join(f"'{d}/*'" for d in subfolders)
    if path.is_dir():
        missing = [d for d in subfolders if not (path / d).is_dir()]
        if missing:
            raise WeightsError(
                f"{path} has no {' or '.join(d + '/' for d in missing)} folder, needed for {what}: download the "
                f"{', '.join(d + '/' for d in missing)} folder(s) of the Hugging Face repo that holds them "
                f"({OFFICIAL_REPO} or {OFFICIAL_REPO}-prior) into {path}/ (e.g. `hf download REPO --include "
                f"{hint} --local-dir {path}`).")
        return path
    from huggingface_hub import snapshot_download

    patterns = [f"{d}/*" for d in subfolders]
    try:
        return Path(snapshot_download(str(source), allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network once below
        pass
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else hub_reachable()
    if reason is None:
        try:
            return Path(snapshot_download(str(source), allow_patterns=patterns, etag_timeout=10))
        except Exception as e:  # noqa: BLE001 - every hub failure ends the same way for the user
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise WeightsError(f"cannot get {what} from {source} ({reason}). Download the "
                       f"{', '.join(d + '/' for d in subfolders)} folder(s) of https://huggingface.co/{source} into "
                       f"a folder (e.g. `hf download {source} --include {hint} --local-dir DIR`) and pass that folder.")
