"""State-dict layout of every model against the official one (``official_keys.json.gz``).

Models are built on the meta device, so even the 1.5B Stage B costs no memory.
"""

from __future__ import annotations

import gzip
import json
import time

import pytest
import torch

from codec.effnet import EfficientNetEncoder
from codec.previewer import Previewer
from codec.stage_a import StageA

from helpers import DATA_DIR
from codec.presets import create_model

OFFICIAL = json.loads(gzip.decompress((DATA_DIR / "official_keys.json.gz").read_bytes()))

BUILDERS = {
    "stage_a": StageA,
    "effnet": EfficientNetEncoder,
    "previewer": Previewer,
    "stage_b_lite": lambda: create_model("stage_b_lite"),
    "stage_b_large": lambda: create_model("stage_b_large"),
    "stage_c_lite": lambda: create_model("stage_c_lite"),
    "stage_c_large": lambda: create_model("stage_c_large"),
}

N_PARAMS = {
    "stage_b_lite": 699_471_248,
    "stage_b_large": 1_562_941_136,
    "stage_a": 18_406_894,
    "effnet": 20_197_968,
    "previewer": 3_979_651,
    "stage_c_lite": 1_030_785_040,
    "stage_c_large": 3_589_103_632,
}


def build_on_meta(name: str) -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    with torch.device("meta"):
        model = BUILDERS[name]()
    return model, time.perf_counter() - start


def key_list(model: torch.nn.Module) -> list[list]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def test_official_file_has_expected_models():
    assert set(BUILDERS) <= set(OFFICIAL)
    for name, n in N_PARAMS.items():
        assert OFFICIAL[name]["n_params"] == n


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_matches_official(name):
    model, _ = build_on_meta(name)
    assert all(t.is_meta for t in model.state_dict().values())
    ours, ref = key_list(model), OFFICIAL[name]["keys"]
    assert len(ours) == len(ref)
    # the complete ordered list: key, shape and dtype
    assert ours == ref
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == OFFICIAL[name]["n_params"] == N_PARAMS[name]
