"""Weights: where they are, how they are read and written, and how models are loaded from them.

* :mod:`.names`: the official repo and file names, the built-in models, our metadata keys;
* :mod:`.checkpoint`: safetensors headers, streamed reading, key plans and writing;
* :mod:`.modules`: models loaded with their keys checked first, dtypes;
* :mod:`.hub`: the one Hugging Face hub client (cache first, fail fast offline);
* :mod:`.source`: :class:`WeightSource`, a folder, repo id, single file or built-in model.

The names below are the package's public API (``from codec import weights as W``; ``W.read_header``).
"""

from ..errors import WeightsError
from .checkpoint import (
                         Checkpoint,
                         KeyPlan,
                         Part,
                         Piece,
                         SafetensorsHeader,
                         StoredTensor,
                         TensorInfo,
                         iter_checkpoint,
                         iter_tensors,
                         read_header,
                         refuse_pickle,
                         save_module,
                         save_state,
                         write_checkpoint,
)
from .hub import hf_subfolders, hub_file, hub_offline, hub_reachable, missing_files_message
from .modules import (
                         check_keys,
                         configured_builder,
                         default_dtype,
                         load_configured,
                         load_module,
                         parse_dtype,
                         resolve_dtype,
)
from .names import (
                         BUILTIN_MODELS,
                         EFFNET_FILE,
                         EMPTY_CAPTION_FILE,
                         META_CONFIG,
                         META_NOTE,
                         META_SAMPLING,
                         OFFICIAL_REPO,
                         PREVIEWER_FILE,
                         STAGE_A_FILE,
                         STAGE_B_FILES,
                         STAGE_C_FILES,
                         WEIGHTS_ENV,
                         BuiltinModel,
)
from .source import WeightSource, default_source

__all__ = [
    "BUILTIN_MODELS", "EFFNET_FILE", "EMPTY_CAPTION_FILE", "META_CONFIG", "META_NOTE", "META_SAMPLING",
    "OFFICIAL_REPO", "PREVIEWER_FILE", "STAGE_A_FILE", "STAGE_B_FILES", "STAGE_C_FILES", "WEIGHTS_ENV", "BuiltinModel",
    "Checkpoint", "KeyPlan", "Part", "Piece", "SafetensorsHeader", "StoredTensor", "TensorInfo", "WeightSource",
    "WeightsError", "check_keys", "configured_builder", "default_dtype", "default_source", "hf_subfolders", "hub_file",
    "hub_offline", "hub_reachable", "iter_checkpoint", "iter_tensors", "load_configured", "load_module",
    "missing_files_message", "parse_dtype", "read_header", "refuse_pickle", "resolve_dtype", "save_module", "save_state",
    "write_checkpoint",
]
