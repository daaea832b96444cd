"""CLIP-G text conditioning through transformers, on a tiny random text encoder in the HF repo layout."""

import shutil
import warnings

import pytest
import torch

from codec import Codec
from codec.text import TextEncoder
from codec.weights import EMPTY_CAPTION_FILE, WeightsError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory, tiny_weights):
    from codec.tiny import write_tiny_text_encoder

    folder = tmp_path_factory.mktemp("with_text")
    for f in tiny_weights.iterdir():
        if f.is_file() and f.name != EMPTY_CAPTION_FILE:
            shutil.copy(f, folder / f.name)
    return write_tiny_text_encoder(folder)


def test_conditions_follow_the_official_recipe(text_folder):
    enc = TextEncoder.from_pretrained(text_folder)
    emb = enc.encode(["a cat", ""])
    assert emb.hidden.shape == (2, 77, 24) and emb.pooled.shape == (2, 1, 24)
    tokens = enc.tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert tokens["input_ids"][0, -1].item() == enc.tokenizer.convert_tokens_to_ids("!")
    out = enc.model(**tokens, output_hidden_states=True)
    # sequence = last layer output *before* the final layer norm; pooled = projected text_embeds
    assert torch.allclose(emb.hidden[:1], out.hidden_states[-1])
    assert not torch.allclose(emb.hidden[:1], out.last_hidden_state)
    assert torch.allclose(emb.pooled[:1, 0], out.text_embeds)


def test_long_prompts_warn_with_what_was_cut(text_folder):
    enc = TextEncoder.from_pretrained(text_folder)
    with pytest.warns(UserWarning, match="ignored"):
        enc.encode("x" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode("short")


def test_placeholder_tokenizer_is_refused():
    class Placeholder:
        def __len__(self):
            return 2

    with pytest.raises(WeightsError, match="placeholder"):
        TextEncoder(Placeholder(), torch.nn.Linear(1, 1))


def test_missing_text_encoder_says_what_to_download(tmp_path):
    with pytest.raises(WeightsError, match="text_encoder/"):
        TextEncoder.from_pretrained(tmp_path)


def test_empty_caption_embedding_is_computed_once_and_cached(text_folder):
    assert not (text_folder / EMPTY_CAPTION_FILE).exists()
    codec = Codec.from_pretrained(text_folder, device="cpu")
    z = torch.randn(1, 16, 2, 2)
    a = codec.decode(z, height=32, width=32, steps=1, output="tensor")
    assert (text_folder / EMPTY_CAPTION_FILE).exists()
    expected = TextEncoder.from_pretrained(text_folder).encode([""]).pooled
    assert torch.allclose(codec.empty_clip.reshape(1, 1, -1), expected)
    fresh = Codec.from_pretrained(text_folder, device="cpu")
    assert fresh._text_encoder is None and fresh.empty_clip is not None
    assert torch.equal(fresh.decode(z, height=32, width=32, steps=1, output="tensor"), a)
    assert fresh._text_encoder is None  # the cached vector was enough
    captioned = fresh.decode(z, height=32, width=32, steps=1, caption="a red house", output="tensor")
    assert not torch.equal(captioned, a)
