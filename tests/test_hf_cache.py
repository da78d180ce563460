"""GrowingCache: the same keys, values and tokens as transformers' DynamicCache, without the copies."""

import warnings
from contextlib import nullcontext

import pytest
import torch
from transformers import DynamicCache

from sea_attention.hf import GrowingCache, cache_kwargs, dense_attention
from sea_attention.hf.cache import GrowingLayer, cache_keyword

from test_generation import VOCAB, build


def decode(model, cache, ids, mask, sizes):
    """Logits of ``ids`` fed in calls of ``sizes`` tokens through ``cache``."""
    logits, start = [], 0
    with torch.no_grad():
        for size in sizes:
            end = start + size
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], **cache_kwargs(cache),
                        use_cache=True)
            logits.append(out.logits)
            start = end
    return torch.cat(logits, 1)


@pytest.mark.parametrize("mode", ["sea", "dense"])
def test_decoding_through_it_equals_the_dynamic_cache(mode):
    model = build("llama")
    ids = torch.randint(1, VOCAB, (2, 600))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    sizes = [20] + [1] * 280 + [7, 1, 292]  # past the first spare capacity (256 rows), twice
    with dense_attention(model, "sdpa") if mode == "dense" else nullcontext():
        growing = decode(model, GrowingCache(), ids, mask, sizes)
        dynamic = decode(model, DynamicCache(), ids, mask, sizes)
    torch.testing.assert_close(growing, dynamic, atol=1e-5, rtol=0)  # strided views: rounding may differ


def test_a_step_writes_into_spare_rows_and_leaves_earlier_views_alone():
    layer = GrowingLayer()
    first = torch.randn(1, 2, 5, 4)
    layer.update(first, first + 1)
    keys, _ = layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))  # grows: room for 256 more
    before = keys.clone()
    grown, _ = layer.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    assert grown.data_ptr() == keys.data_ptr()  # the same storage: nothing was copied
    assert torch.equal(keys, before) and layer.get_seq_length() == 9
    assert torch.equal(grown[:, :, :5], first) and torch.equal(grown[:, :, 6:], torch.ones(1, 2, 3, 4))


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate_with_it_equals_generate_with_the_default_cache(mode):
    model = build("llama")
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, pad_token_id=0,
                  do_sample=False, num_beams=3 if mode == "beam" else 1)
    assert torch.equal(model.generate(**kwargs, **cache_kwargs(GrowingCache())), model.generate(**kwargs))


def test_generate_and_forward_take_the_cache_without_a_deprecation_warning():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns); 5.23 knows only
    ``past_key_values`` (``generate`` refuses ``cache``). ``cache_kwargs`` names it as the installed one takes it."""
    import transformers
    from packaging.version import Version

    assert cache_keyword() == ("cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values")
    model = build("llama")
    ids = torch.randint(1, VOCAB, (1, 8))
    cache = GrowingCache()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0, **cache_kwargs(cache))
        assert cache.get_seq_length() == 11  # generate used our cache: the prompt and 3 of the 4 new tokens
        steps = GrowingCache()
        model(input_ids=out[:, :-1], use_cache=True, **cache_kwargs(steps))
        model(input_ids=out[:, -1:], use_cache=True, **cache_kwargs(steps))
    assert steps.get_seq_length() == 12


def test_batch_operations_keep_the_rows_and_the_room_to_grow():
    layer = GrowingLayer()
    keys = torch.randn(3, 2, 4, 8)
    layer.update(keys, -keys)
    layer.batch_select_indices(torch.tensor([2, 0]))
    layer.update(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    assert torch.equal(layer.keys[:, :, :4], keys[[2, 0]]) and torch.equal(layer.values[:, :, :4], -keys[[2, 0]])
    layer.batch_repeat_interleave(2)
    layer.update(torch.ones(4, 2, 1, 8), torch.ones(4, 2, 1, 8))
    assert layer.keys.shape == (4, 2, 6, 8) and torch.equal(layer.keys[1, :, :4], keys[2])
    layer.reset()
    layer.update(keys, keys)
    assert torch.equal(layer.keys, keys)
