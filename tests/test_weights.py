"""Checkpoint loading: strict key/shape checks, refusal of pickle files, truncated files, dtype handling."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from codec import weights as W
from codec.stage_a import StageA
from codec.presets import create_model, get_preset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tiny_a():
    return create_model("stage_a_tiny")


@pytest.fixture
def stage_a_file(tmp_path):
    model = _tiny_a()
    return W.save_module(model, tmp_path / "stage_a.safetensors", get_preset("stage_a_tiny").kwargs()), model


def test_roundtrip_is_exact_and_uses_stored_config(stage_a_file):
    path, model = stage_a_file
    header = W.read_header(path)
    assert header.config == get_preset("stage_a_tiny").kwargs()
    loaded = W.load_module(lambda: StageA(**header.config), path, torch.float32, "cpu", "Stage A")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_into_bf16_keeps_integer_buffers(stage_a_file):
    path, model = stage_a_file
    loaded = W.load_module(_tiny_a, path, torch.bfloat16, "cpu", "Stage A")
    sd = loaded.state_dict()
    assert sd["down_blocks.3.1.weight"].dtype == torch.bfloat16
    assert sd["down_blocks.3.1.num_batches_tracked"].dtype == torch.int64
    ref = model.state_dict()["up_blocks.1.channelwise.0.weight"].to(torch.bfloat16)
    assert torch.equal(sd["up_blocks.1.channelwise.0.weight"], ref)


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tmp_path):
    sd = {k: v.clone() for k, v in _tiny_a().state_dict().items()}
    del sd["out_block.0.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["in_block.1.weight"] = torch.zeros(5, 12, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(W.WeightsError) as e:
        W.load_module(_tiny_a, path, torch.float32, "cpu", "Stage A")
    msg = str(e.value)
    assert "1 missing key(s)" in msg and "out_block.0.bias" in msg
    assert "1 unexpected key(s)" in msg and "extra.weight" in msg
    assert "wrong shape" in msg and "in_block.1.weight: file [5, 12, 1, 1], model [16, 12, 1, 1]" in msg
    assert str(path) in msg


def test_truncated_file_is_reported(stage_a_file, tmp_path):
    path, _ = stage_a_file
    data = path.read_bytes()
    cut = tmp_path / "stage_a_cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(W.WeightsError, match="truncated"):
        W.load_module(_tiny_a, cut, torch.float32, "cpu", "Stage A")
    tiny = tmp_path / "four_bytes.safetensors"
    tiny.write_bytes(b"abcd")
    with pytest.raises(W.WeightsError, match="not a safetensors file"):
        W.read_header(tiny)


def test_garbage_header_is_reported(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 100)
    with pytest.raises(W.WeightsError, match="not JSON"):
        W.read_header(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(W.WeightsError, match="header length"):
        W.read_header(path)
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(W.WeightsError, match="corrupt"):
        W.read_header(path)


def test_pickle_files_are_refused_with_a_reason(tmp_path):
    pt = tmp_path / "stage_a.pt"
    torch.save(_tiny_a().state_dict(), pt)
    with pytest.raises(W.WeightsError, match="arbitrary code"):
        W.read_header(pt)
    disguised = tmp_path / "stage_a.safetensors"
    disguised.write_bytes(pt.read_bytes())
    with pytest.raises(W.WeightsError, match="pickle"):
        W.read_header(disguised)


@pytest.mark.parametrize("n", [0x180, 0x4B50])
def test_safetensors_whose_header_length_looks_like_a_pickle_magic_loads(tmp_path, n):
    """A header of 0x180 bytes starts the file with 0x80 (pickle's magic), one of 0x4b50 with "PK" (zip's)."""
    import json

    from safetensors.torch import load_file

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", n) + header + b" " * (n - len(header)) + torch.ones(2).numpy().tobytes())
    assert path.read_bytes()[:1] == b"\x80" or path.read_bytes()[:2] == b"PK"
    assert torch.equal(load_file(str(path))["w"], torch.ones(2))  # a valid file for safetensors itself
    assert list(W.read_header(path).tensors) == ["w"]


def test_missing_folder_files_name_what_to_download(tmp_path):
    src = W.WeightSource(tmp_path)
    with pytest.raises(W.WeightsError) as e:
        src.require([W.STAGE_A_FILE, W.EFFNET_FILE])
    msg = str(e.value)
    assert "stage_a.safetensors" in msg and "effnet_encoder.safetensors" in msg
    assert "https://huggingface.co/stabilityai/stable-cascade/resolve/main/stage_a.safetensors" in msg
    assert str(tmp_path) in msg


@pytest.fixture
def network(monkeypatch):
    """Every connection attempt and hub download, recorded instead of made: huggingface_hub retries a failing
    download for about 30 s, so failing fast means making no download attempt and at most one connection probe."""
    import socket

    import huggingface_hub

    calls = {"connect": [], "download": []}

    def connect(self, address):
        calls["connect"].append(address)
        raise ConnectionRefusedError(111, "Connection refused (test: no network)")

    def download(*args, **kwargs):
        calls["download"].append(args)
        raise AssertionError("hf_hub_download must not be reached")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: connect(self, address))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_repo_id_offline_fails_fast_and_says_what_to_do(monkeypatch, network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    src = W.WeightSource("someone/not-cached-repo")
    with pytest.raises(W.WeightsError, match="hf download someone/not-cached-repo"):
        src.require([W.STAGE_A_FILE])
    with pytest.raises(W.WeightsError, match="HF_HUB_OFFLINE"):
        src.path(W.STAGE_A_FILE)
    assert network == {"connect": [], "download": []}  # offline: not even a probe


def test_stage_b_file_choice_follows_dtype(tmp_path):
    for name in ("stage_b_lite.safetensors", "stage_b_lite_bf16.safetensors"):
        (tmp_path / name).write_bytes(b"")
    src = W.WeightSource(tmp_path)
    assert src.stage_b_file("lite", torch.bfloat16) == "stage_b_lite_bf16.safetensors"
    assert src.stage_b_file("lite", torch.float32) == "stage_b_lite.safetensors"
    (tmp_path / "stage_b_lite.safetensors").unlink()
    assert src.stage_b_file("lite", torch.float32) == "stage_b_lite_bf16.safetensors"
    assert src.stage_b_file("large", torch.float32) == "stage_b.safetensors"
    with pytest.raises(W.WeightsError, match=r"stage_b_bf16.safetensors instead of stage_b.safetensors"):
        src.require(["stage_b.safetensors"])


def test_default_dtype_follows_device():
    assert W.default_dtype("cpu") == torch.float32
    assert W.default_dtype("cuda") == torch.bfloat16
    assert W.parse_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        W.parse_dtype("int8", "cpu")


_RSS_SCRIPT = r"""
import re, sys, torch
from codec import weights as W
from codec.stage_b import StageB

def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

cfg = dict(c_hidden=[256, 512, 1024, 1024], nhead=[-1, -1, 16, 16], blocks=[[1, 2, 4, 2], [2, 4, 2, 1]],
           block_repeat=[[1, 1, 1, 1], [1, 1, 1, 1]])
dtype = getattr(torch, sys.argv[2])
torch.randn(1 << 20).to(dtype)  # load the conversion kernels' code pages before measuring (a fixed cost)
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM) to the current RSS
    f.write("5")
base = status("VmRSS")
model = W.load_module(lambda: StageB(**cfg), sys.argv[1], dtype, "cpu", "Stage B")
peak = status("VmHWM")
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(peak - base, size)
"""


@pytest.mark.slow  # an 800 MB model loaded in a subprocess
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_peak_memory_is_close_to_the_model_size(tmp_path, dtype):
    """Peak RSS growth while loading ≤ 1.25 × the model's size in the target dtype (no random init, no 2nd copy)."""
    import subprocess
    import sys

    from codec.stage_b import StageB

    cfg = dict(c_hidden=[256, 512, 1024, 1024], nhead=[-1, -1, 16, 16], blocks=[[1, 2, 4, 2], [2, 4, 2, 1]],
               block_repeat=[[1, 1, 1, 1], [1, 1, 1, 1]])
    path = W.save_module(StageB(**cfg), tmp_path / "b.safetensors")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), dtype], capture_output=True, text=True,
                         check=True).stdout.split()
    grown, size = int(out[0]), int(out[1])
    assert size > 800e6 if dtype == "float32" else size > 400e6
    assert grown <= 1.25 * size, f"peak RSS grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert W.hub_reachable(timeout=2) is not None
    network["connect"].clear()
    with pytest.raises(W.WeightsError, match="not reachable"):
        W.WeightSource("someone/not-cached-repo").require([W.STAGE_A_FILE, W.EFFNET_FILE])
    with pytest.raises(W.WeightsError, match="not reachable"):
        W.WeightSource("someone/not-cached-repo").path(W.STAGE_A_FILE)
    # one TCP probe per call, to the configured endpoint, and no (retrying) download
    assert network == {"connect": [("127.0.0.1", 9)] * 2, "download": []}
