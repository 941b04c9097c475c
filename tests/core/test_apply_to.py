"""The common option apply_to='decode': prefill and training attend densely (the mechanism's cache is then the
dense model's), and decode steps run the mechanism exactly as apply_to='all' does over the same cache."""

import copy

import pytest
import torch
from transformers import DynamicCache

import hf_attn_plus

from .models import SPARSE, left_pad, tiny_model, token_batch, with_mechanism


@pytest.mark.parametrize("name", ["sliding_window", "topk", "block_topk"])
def test_prefill_dense_decode_sparse(name):
    ids, mask = left_pad([token_batch(1, 26, seed=1)[0], token_batch(1, 19, seed=2)[0]])[:2]
    dense = tiny_model("llama")
    decode_only = with_mechanism(tiny_model("llama"), name, dict(SPARSE[name], apply_to="decode"))
    everywhere = with_mechanism(tiny_model("llama"), name, SPARSE[name])
    with torch.no_grad():
        cache = DynamicCache(config=dense.config)
        prefill = dense(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        own_cache = DynamicCache(config=dense.config)
        torch.testing.assert_close(
            decode_only(ids, attention_mask=mask, past_key_values=own_cache, use_cache=True).logits, prefill,
            atol=1e-5, rtol=1e-5,
        )
        step = prefill[:, -1:].argmax(-1)
        step_mask = torch.cat((mask, torch.ones_like(step)), -1)
        sparse_step = everywhere(step, attention_mask=step_mask, past_key_values=copy.deepcopy(cache)).logits
        assert not torch.allclose(sparse_step, dense(step, attention_mask=step_mask, past_key_values=copy.deepcopy(cache)).logits)
        torch.testing.assert_close(
            decode_only(step, attention_mask=step_mask, past_key_values=own_cache).logits, sparse_step, atol=1e-5, rtol=1e-5
        )


def test_training_is_dense():
    ids = token_batch(2, 24)
    dense = tiny_model("llama").train()
    decode_only = with_mechanism(tiny_model("llama"), "sliding_window", dict(window=3, apply_to="decode")).train()
    torch.testing.assert_close(decode_only(ids, labels=ids).loss, dense(ids, labels=ids).loss)


def test_mechanisms_computing_their_own_attention_refuse():
    model = with_mechanism(tiny_model("llama"), "gated_delta", dict(apply_to="decode"))
    with pytest.raises(hf_attn_plus.OptionError, match="apply_to='decode' is for mechanisms that select keys"):
        model(token_batch(1, 8))
