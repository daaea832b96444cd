"""New and re-trained text tokens (the official ``train_tokens``), trained as embedding deltas.

``train_tokens`` is a list of ``[token, init_regex]`` pairs (official.md §8):

* a token written ``[name]`` or ``<name>`` is *added* to the tokenizer; its embedding row is
  appended to CLIP's token-embedding matrix, initialised to the mean of the rows of every
  vocabulary entry matching ``init_regex`` (zeros when ``init_regex`` is empty or matches
  nothing); its id is the next free one (49408 for the first token on CLIP-G);
* any other string is a regex selecting existing vocabulary entries to re-train.

The selected rows get a :class:`~codec.generation.lora.TokenDelta` (zeros at the start),
registered as a parametrisation of the embedding weight, so the frozen text encoder passes
gradients to it. The pooled text embedding is taken at the first EOS token
(``TextEncoder.pool_at = "eos"``): with the old "largest id" rule an added token (id above
EOS) would be pooled instead (official.md §9.2).
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

import torch
from torch.nn.utils import parametrize

from ..errors import UsageError
from ..text import TextEncoder
from .lora import TokenDelta

NEW_TOKEN = re.compile(r"^(\[[^\]]+\]|<[^>]+>)$")


def _embedding(encoder: TextEncoder) -> torch.nn.Embedding:
    return encoder.model.text_model.embeddings.token_embedding


def add_train_tokens(encoder: TextEncoder, train_tokens: Sequence[Sequence[str | None]]) -> list[int]:
    """Add the new tokens of ``train_tokens`` to ``encoder`` and return the ids to train (sorted, unique)."""
    emb = _embedding(encoder)
    if parametrize.is_parametrized(emb, "weight"):
        raise RuntimeError("add tokens before attaching a token delta")
    tokenizer = encoder.tokenizer
    ids: list[int] = []
    for pair in train_tokens:
        if isinstance(pair, str) or len(pair) != 2:
            raise UsageError(f"each train_tokens entry must be [token, init_regex], got {pair!r}")
        token, init = pair
        vocab = tokenizer.get_vocab()
        if NEW_TOKEN.match(token):
            if token in vocab:
                ids.append(vocab[token])
                continue
            rows = emb.weight.shape[0]
            new_row = torch.zeros(1, emb.weight.shape[1], dtype=emb.weight.dtype, device=emb.weight.device)
            if init:
                chosen = [v for k, v in vocab.items() if re.search(init, k) is not None and v < rows]
                if chosen:
                    new_row = emb.weight.data[chosen].mean(dim=0, keepdim=True)
                else:
                    warnings.warn(f"no vocabulary entry matches {init!r}: the new token {token} starts at zero",
                                  stacklevel=2)
            if tokenizer.add_tokens([token]) != 1:
                raise UsageError(f"the tokenizer refused to add the token {token!r}")
            new_id = tokenizer.convert_tokens_to_ids(token)
            if new_id != rows:
                raise RuntimeError(f"the new token {token} got id {new_id}, but the embedding matrix has {rows} rows")
            emb.weight = torch.nn.Parameter(torch.cat([emb.weight.data, new_row]), requires_grad=False)
            emb.num_embeddings = rows + 1
            encoder.model.config.vocab_size = rows + 1
            ids.append(new_id)
        else:
            found = [v for k, v in vocab.items() if re.search(token, k) is not None]
            if not found:
                raise UsageError(f"train_tokens: {token!r} matches no vocabulary entry (write [name] to add a new "
                                 "token)")
            ids += found
    return sorted(set(ids))


def attach_token_delta(encoder: TextEncoder, indices: Sequence[int]) -> TokenDelta:
    """Register a zero-initialised :class:`TokenDelta` on the rows ``indices`` of the embedding."""
    emb = _embedding(encoder)
    delta = TokenDelta(indices, emb.weight.shape[1], dtype=torch.float32, device=emb.weight.device)
    parametrize.register_parametrization(emb, "weight", delta, unsafe=True)
    return delta


def detach_token_delta(encoder: TextEncoder, merge: bool = False) -> None:
    """Remove the token delta; ``merge=True`` keeps its effect in the embedding matrix."""
    emb = _embedding(encoder)
    if parametrize.is_parametrized(emb, "weight"):
        parametrize.remove_parametrizations(emb, "weight", leave_parametrized=merge)


def load_token_state(encoder: TextEncoder, state: dict[str, torch.Tensor], train_tokens: Sequence[Sequence[str]],
                     source: str = "the LoRA file") -> TokenDelta:
    """Add ``train_tokens`` to ``encoder`` and attach the deltas saved in ``state`` (``embeddings.*`` keys)."""
    indices = state["embeddings.indices"].long().tolist()
    rows = _embedding(encoder).weight.shape[0]
    if any(i >= rows for i in indices) and not train_tokens:
        raise UsageError(f"{source} trains new token id(s) {[i for i in indices if i >= rows]} but does not name "
                         "them; give the tokens it was trained with, e.g. tokens=[['[name]', '^dog</w>']] (the "
                         "train_tokens of its training config).")
    ids = add_train_tokens(encoder, train_tokens) if train_tokens else sorted(set(indices))
    if sorted(set(indices)) != ids:
        raise UsageError(f"{source} holds deltas for token ids {indices}, but its tokens {list(train_tokens)} give "
                         f"ids {ids}; the tokenizer differs from the one it was trained with.")
    delta = attach_token_delta(encoder, indices)
    with torch.no_grad():
        delta.embeddings.copy_(state["embeddings.embeddings"])
    return delta
