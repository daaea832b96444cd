"""New tokens ([name] added to the tokenizer, initialised from existing rows, trained as a delta)."""

import pytest
import torch

from codec.text import TextEncoder
from codec.generation.tokens import add_train_tokens, attach_token_delta, detach_token_delta, load_token_state


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    from codec.tiny import write_tiny_text_encoder

    return write_tiny_text_encoder(tmp_path_factory.mktemp("text"))


def test_new_token_is_added_after_the_vocabulary_and_initialised_from_the_regex(text_dir):
    enc = TextEncoder.from_pretrained(text_dir)
    rows = enc.model.text_model.embeddings.token_embedding.weight.shape[0]
    vocab = enc.tokenizer.get_vocab()
    ids = add_train_tokens(enc, [["[sks]", "^[ab]</w>$"]])
    assert ids == [rows] == [len(enc.tokenizer) - 1]
    weight = enc.model.text_model.embeddings.token_embedding.weight
    expected = weight[[vocab["a</w>"], vocab["b</w>"]]].mean(0)
    assert torch.equal(weight[rows], expected)
    tokens = enc.tokenize(["a photo of [sks]"])["input_ids"][0].tolist()
    assert tokens.count(rows) == 1
    assert add_train_tokens(enc, [["[sks]", None]]) == ids  # adding again is a no-op
    assert add_train_tokens(enc, [["^c</w>$", None]]) == [vocab["c</w>"]]  # a regex selects existing tokens


def test_delta_changes_only_captions_with_the_token(text_dir):
    enc = TextEncoder.from_pretrained(text_dir)
    enc.pool_at = "eos"
    ids = add_train_tokens(enc, [["[sks]", "^a</w>$"]])
    before = enc.encode(["a photo of [sks]", "a photo of a cat"])
    delta = attach_token_delta(enc, ids)
    assert torch.equal(enc.encode(["a photo of [sks]"]).hidden, before.hidden[:1])  # zero delta
    with torch.no_grad():
        delta.embeddings.normal_()
    after = enc.encode(["a photo of [sks]", "a photo of a cat"])
    assert (after.hidden[0] - before.hidden[0]).abs().max() > 1e-3
    assert (after.pooled[0] - before.pooled[0]).abs().max() > 1e-3
    assert torch.equal(after.hidden[1], before.hidden[1]) and torch.equal(after.pooled[1], before.pooled[1])
    # gradients reach the delta through the frozen encoder
    out = enc.embed_tokens(**enc.tokenize(["[sks]"]))
    out.pooled.sum().backward()
    assert delta.embeddings.grad is not None and delta.embeddings.grad.abs().sum() > 0
    merged_before = enc.encode(["[sks]"]).hidden
    detach_token_delta(enc, merge=True)
    assert torch.equal(enc.encode(["[sks]"]).hidden, merged_before)


def test_pooled_position_rule_matters_with_an_added_token(text_dir):
    """official.md §9.2: the old argmax rule pools at the added token (largest id), not at EOS."""
    enc = TextEncoder.from_pretrained(text_dir)
    add_train_tokens(enc, [["[sks]", "^a</w>$"]])
    enc.pool_at = "eos"
    at_eos = enc.encode(["[sks] cat"]).pooled
    enc.pool_at = "argmax"
    at_token = enc.encode(["[sks] cat"]).pooled
    assert (at_eos - at_token).abs().max() > 1e-4
    enc.pool_at = "eos"
    plain_eos = enc.encode(["a cat"]).pooled
    enc.pool_at = "argmax"
    assert torch.allclose(enc.encode(["a cat"]).pooled, plain_eos)  # identical without added tokens


def test_token_state_round_trip_and_missing_names(text_dir):
    enc = TextEncoder.from_pretrained(text_dir)
    ids = add_train_tokens(enc, [["[sks]", "^a</w>$"]])
    delta = attach_token_delta(enc, ids)
    with torch.no_grad():
        delta.embeddings.normal_()
    state = {"embeddings.embeddings": delta.embeddings.detach().clone(), "embeddings.indices": delta.indices.clone()}
    want = enc.encode(["[sks] dog"]).hidden
    fresh = TextEncoder.from_pretrained(text_dir)
    with pytest.raises(ValueError, match="does not name"):
        load_token_state(fresh, state, [])
    load_token_state(fresh, state, [["[sks]", "^a</w>$"]])
    assert torch.equal(fresh.encode(["[sks] dog"]).hidden, want)
