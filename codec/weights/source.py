"""Weight sources: a local folder, a Hugging Face repo id, a single ``.safetensors`` file or a built-in model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import WeightsError
from .checkpoint import SafetensorsHeader, read_header
from .hub import (
    builtin_missing_message,
    hub_file,
    hub_offline,
    hub_reachable,
    hub_unreachable_message,
    missing_files_message,
)
from .names import BUILTIN_MODELS, EFFNET_FILE, OFFICIAL_REPO, STAGE_A_FILE, STAGE_B_FILES, STAGE_C_FILES, WEIGHTS_ENV


def default_source(weights: str | os.PathLike | None = None) -> str:
    """The weights to use: ``weights`` when given, else ``$CASCADE_WEIGHTS``, else the official repo id."""
    return str(weights or os.environ.get(WEIGHTS_ENV) or OFFICIAL_REPO)


class WeightSource:
    """A local folder, a Hugging Face repo id, or one ``.safetensors`` file (a ComfyUI single-file checkpoint).

    A file stands for its folder with that file ``pinned``: the models it holds are taken
    from it before any other file of the folder (:mod:`codec.layouts` decides what it holds).
    """

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        self.pinned: str | None = None
        self.builtin: str | None = None
        self._headers: dict[str, SafetensorsHeader] = {}
        path = Path(source).expanduser()
        if self.source in BUILTIN_MODELS:  # a bare name selects the shipped model; "./mini" is a folder
            self.builtin, self.folder, self.repo_id = self.source, BUILTIN_MODELS[self.source].folder, None
            if not (self.folder / STAGE_A_FILE).is_file():
                raise WeightsError(f"the built-in {self.source!r} model is not in this installation ({self.folder} "
                                   "has no weights); reinstall cascade-codec, or pass a folder of weights instead.")
        elif path.is_dir():
            self.folder: Path | None = path
            self.repo_id: str | None = None
        elif path.is_file() and path.suffix == ".safetensors":
            self.folder, self.repo_id, self.pinned = path.parent, None, path.name
        elif path.exists():
            raise WeightsError(f"{path} is not a .safetensors file; give the folder that holds the weights "
                               f"({STAGE_A_FILE}, {EFFNET_FILE}, stage_b_lite[_bf16].safetensors, …) or a ComfyUI "
                               "single-file checkpoint (stable_cascade_stage_c.safetensors, …).")
        elif str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
            self.folder, self.repo_id = None, str(source)
        else:
            raise WeightsError(f"{source} is neither an existing folder nor a Hugging Face repo id "
                               f"(like {OFFICIAL_REPO}).")

    def __repr__(self) -> str:
        return f"WeightSource({self.source!r})"

    def has(self, filename: str) -> bool:
        """Whether the file is present locally (folder) or in the local hub cache (repo id)."""
        if self.folder is not None:
            return (self.folder / filename).is_file()
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(self.repo_id, filename), str)

    def header(self, filename: str) -> SafetensorsHeader:
        """The parsed header of ``filename`` (read once per source; downloads it for a repo id)."""
        if filename not in self._headers:
            self._headers[filename] = read_header(self.path(filename))
        return self._headers[filename]

    def path(self, filename: str) -> Path:
        """Local path of ``filename``, downloading it from the hub if needed."""
        if self.folder is not None:
            p = self.folder / filename
            if not p.is_file():
                self.require([filename])
            return p
        return hub_file(self.repo_id, filename)

    def require(self, filenames: list[str]) -> None:
        """Raise one error naming every file that is absent (folder) or uncached and unreachable (repo id)."""
        absent = [f for f in filenames if not self.has(f)]
        if not absent:
            return
        if self.builtin is not None:
            raise WeightsError(builtin_missing_message(self.builtin, absent))
        if self.folder is not None:
            alternatives = [f"{alt} instead of {f}" for f in absent if (alt := self.precision_alternative(f))]
            raise WeightsError(missing_files_message(self.folder, absent)
                               + "".join(f"\n({a} works too.)" for a in alternatives))
        offline = hub_offline()
        reason = "they are not in the local cache and HF_HUB_OFFLINE is set" if offline else hub_reachable()
        if reason is not None:
            if not offline:
                reason = f"they are not in the local cache and {reason}"
            raise WeightsError(hub_unreachable_message(self.repo_id, absent, reason))

    def stage_b_file(self, size: str, dtype: torch.dtype) -> str:
        """Pick the Stage B file: the bf16 one for bf16/fp16 models, else fp32, using what is present."""
        return self._variant_file(STAGE_B_FILES, "stage_b", size, dtype)

    def stage_c_file(self, size: str, dtype: torch.dtype) -> str:
        """Pick the Stage C file, as :meth:`stage_b_file` does for Stage B."""
        return self._variant_file(STAGE_C_FILES, "stage_c", size, dtype)

    def _variant_file(self, table: dict[str, dict[str, str]], what: str, size: str, dtype: torch.dtype) -> str:
        if size not in table:
            raise WeightsError(f"{what} must be one of {sorted(table)}, got {size!r}")
        names = table[size]
        order = ["bf16", "fp32"] if dtype in (torch.bfloat16, torch.float16) else ["fp32", "bf16"]
        for variant in order:
            if self.has(names[variant]):
                return names[variant]
        return names[order[0]]

    @staticmethod
    def precision_alternative(filename: str) -> str | None:
        """The other precision's file name of a Stage B or Stage C file (either one loads into any dtype)."""
        for names in [*STAGE_B_FILES.values(), *STAGE_C_FILES.values()]:
            if filename == names["fp32"]:
                return names["bf16"]
            if filename == names["bf16"]:
                return names["fp32"]
        return None
