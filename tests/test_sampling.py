"""The shared sampler on hand-made logits: greedy, filters, determinism, order/padding independence."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from llmqp import InvalidArgument, SamplingParams
from llmqp.plans import bucket_k, k_buckets, pad_allowed, union_inputs
from llmqp.sampling import select


def _select(logits, ids, *, temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0, pad_to=None):
    logits = np.asarray(logits, np.float32)
    ids = np.asarray(ids, np.int32)
    k = len(ids)
    width = pad_to or k
    lp = np.full((1, width), -1e9, np.float32)
    ip = np.zeros((1, width), np.int32)
    valid = np.zeros((1, width), bool)
    lp[0, :k], ip[0, :k], valid[0, :k] = logits, ids, True
    index, logprob = select(jnp.asarray(lp), jnp.asarray(ip), jnp.asarray(valid), jnp.asarray([seed], jnp.uint32),
                            jnp.asarray([step], jnp.int32), jnp.asarray([temperature], jnp.float32),
                            jnp.asarray([top_k], jnp.int32), jnp.asarray([top_p], jnp.float32),
                            greedy=temperature == 0)
    return int(ids[int(index[0])]), float(logprob[0])


def test_greedy_takes_argmax_and_reports_renormalised_logprob():
    logits = [1.0, 3.0, 2.0]
    token, logprob = _select(logits, [10, 20, 30])
    assert token == 20
    expected = 3.0 - np.log(np.exp(1.0) + np.exp(3.0) + np.exp(2.0))
    assert logprob == pytest.approx(expected, abs=1e-6)


def test_greedy_tie_goes_to_lowest_id():
    assert _select([5.0, 5.0, 1.0], [7, 9, 11])[0] == 7


def test_padding_never_chosen_and_does_not_change_the_draw():
    logits, ids = [0.1, 0.2, 0.3], [4, 5, 6]
    for seed in range(20):
        a = _select(logits, ids, temperature=1.0, seed=seed)
        b = _select(logits, ids, temperature=1.0, seed=seed, pad_to=32)
        assert a == b and a[0] in ids


def test_top_k_1_and_tiny_top_p_equal_greedy():
    rng = np.random.default_rng(0)
    for seed in range(10):
        logits = rng.normal(size=50)
        ids = np.arange(50) * 3
        greedy = _select(logits, ids)[0]
        assert _select(logits, ids, temperature=1.5, top_k=1, seed=seed)[0] == greedy
        assert _select(logits, ids, temperature=1.5, top_p=1e-6, seed=seed)[0] == greedy


def test_top_k_restricts_to_k_best():
    logits = np.array([0.0, 4.0, 3.9, 3.8, -1.0, 0.5])
    ids = np.arange(6)
    seen = {_select(logits, ids, temperature=5.0, top_k=3, seed=s)[0] for s in range(200)}
    assert seen == {1, 2, 3}


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    seen = {_select(logits, np.arange(4), temperature=1.0, top_p=0.7, seed=s)[0] for s in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7


def test_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    counts = np.zeros(3)
    for s in range(1500):
        counts[_select(np.log(probs), [0, 1, 2], temperature=1.0, seed=s)[0]] += 1
    assert np.allclose(counts / counts.sum(), probs, atol=0.04)


def test_noise_is_keyed_by_token_id_not_position():
    # The same allowed tokens in a longer row (extra, impossible tokens) give the same choice: the draw
    # only depends on (seed, step, token id).
    logits = np.array([0.3, 0.1, 0.2])
    for seed in range(20):
        small = _select(logits, [3, 8, 12], temperature=1.0, seed=seed, step=4)
        big = _select(np.concatenate([logits, [-np.inf, -np.inf]]), [3, 8, 12, 20, 21], temperature=1.0,
                      seed=seed, step=4)
        assert small[0] == big[0]


def test_sampling_params_validation():
    with pytest.raises(InvalidArgument, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidArgument, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidArgument, match="top_k"):
        SamplingParams(top_k=-2)
    with pytest.raises(InvalidArgument, match="seed"):
        SamplingParams(seed=-1)


def test_k_buckets_and_padding():
    assert k_buckets(49152) == [8, 32, 128, 512, 2048, 8192, 32768, 49152]
    assert bucket_k(1, 49152) == 8 and bucket_k(129, 49152) == 512 and bucket_k(40000, 49152) == 49152
    ids, valid = pad_allowed([np.array([3, 5]), np.array([1, 2, 9])], 100)
    assert ids.shape == (2, 8)
    assert ids[1, :3].tolist() == [1, 2, 9] and valid.sum(axis=1).tolist() == [2, 3]
    union, pos = union_inputs([np.array([3, 5]), np.array([1, 3, 9])], ids, 100)
    assert union[:4].tolist() == [1, 3, 5, 9]
    assert union[pos[0, :2]].tolist() == [3, 5] and union[pos[1, :3]].tolist() == [1, 3, 9]


def test_top_p_applies_to_the_renormalised_top_k_distribution():
    # probs 0.4 / 0.3 / 0.3. top_k=2 renormalises to 0.571 / 0.429, so top_p=0.5 keeps the first token
    # alone. A joint filter (top-p over the full distribution: 0.4 < 0.5) would keep the second as well.
    logits = np.log([0.4, 0.3, 0.3])
    seen = {_select(logits, [10, 20, 30], temperature=1.0, top_k=2, top_p=0.5, seed=s)[0] for s in range(200)}
    assert seen == {10}
    # Without top-k the same top_p keeps two tokens: the renormalisation is what changed the outcome.
    seen = {_select(logits, [10, 20, 30], temperature=1.0, top_p=0.5, seed=s)[0] for s in range(200)}
    assert seen == {10, 20}


def test_top_k_keeps_exactly_k_with_ties_broken_by_lower_id():
    # Four equal logits: top_k=2 keeps exactly two, the two lowest ids, whatever their position.
    seen = {_select([1.0, 1.0, 1.0, 1.0], [3, 5, 8, 13], temperature=1.0, top_k=2, seed=s)[0]
            for s in range(200)}
    assert seen == {3, 5}
    seen = {_select([1.0, 1.0, 0.0, 1.0], [3, 5, 8, 13], temperature=1.0, top_k=3, seed=s)[0]
            for s in range(200)}
    assert seen == {3, 5, 13}  # the three tied maxima; 8 is below the cutoff


def test_top_p_ties_at_the_cutoff_broken_by_lower_id():
    # Four equal tokens (0.25 each): top_p=0.5 is reached after two of them, the two lowest ids.
    seen = {_select([2.0, 2.0, 2.0, 2.0], [4, 6, 9, 11], temperature=1.0, top_p=0.5, seed=s)[0]
            for s in range(200)}
    assert seen == {4, 6}


def test_logprob_is_the_allowed_set_probability_at_temperature_1():
    # The reported log-prob ignores temperature, top-k and top-p: it is the model's distribution
    # restricted to the allowed set.
    logits = np.array([1.0, 3.0, 2.0])
    expected = logits - np.log(np.exp(logits).sum())
    for seed in range(20):
        token, logprob = _select(logits, [10, 20, 30], temperature=0.7, top_k=2, top_p=0.9, seed=seed)
        assert logprob == pytest.approx(expected[[10, 20, 30].index(token)], abs=1e-6)
