"""The planner on a simulated cost environment: known per-arm latency functions plus seeded noise (and
GC-like outliers), no model. Checks regret, convergence, drift, the roofline prior, persistence."""

from __future__ import annotations

import functools
import json
import multiprocessing
import re
import time
import warnings

import numpy as np
import pytest

from llmqp.planner import (BanditConfig, LinUCBPolicy, Planner, RooflinePolicy, StepContext, reset, roofline_for,
                           saved, state_path)
from llmqp.plans import PlanKind, bucket_k, k_buckets

V, D = 49152, 576  # SmolLM2-135M's vocabulary and hidden size
DENSE, SPARSE, UNION = PlanKind.DENSE, PlanKind.SPARSE, PlanKind.SPARSE_UNION


def ctx(batch: int, k: int, union: int | None = None, vocab: int = V, device: str = "cpu") -> StepContext:
    return StepContext(k_max=k, k_mean=float(k), k_union=k if union is None else union, batch_size=batch,
                       vocab_size=vocab, hidden_size=D, device_kind=device)


def arms_for(c: StepContext) -> list[PlanKind]:
    return [DENSE, SPARSE, UNION] if c.batch_size > 1 else [DENSE, SPARSE]


def true_head_ms(c: StepContext, arm: PlanKind, *, dense_scale: float = 1.0, sparse_scale: float = 1.0) -> float:
    """A CPU-like device the roofline prior misjudges: dense streams faster and gathers run slower than
    assumed (8 GB/s, 50 GFLOP/s, a per-row dense cost) — so the prior picks wrong in some contexts."""
    b, k_pad, u_pad = c.batch_size, bucket_k(c.k_max, V), bucket_k(c.k_union, V)
    common = 0.4 + 0.05 * b
    if arm is DENSE:
        head = dense_scale * (5.0 + 0.6 * b)
    elif arm is SPARSE:
        head = sparse_scale * (0.1 + b * k_pad * D * 4 / 8e9 * 1e3)
    else:
        head = 0.15 + u_pad * D * 4 / 8e9 * 1e3 + 2 * b * u_pad * D / 50e9 * 1e3
    return common + head


# A mixed workload: JSON keys (tiny K), free text (huge K), batches that share or do not share ids.
CONTEXTS = [ctx(1, 5), ctx(1, 20000), ctx(4, 300), ctx(4, 600, 1000), ctx(16, 8000, 30000), ctx(16, 3000),
            ctx(16, 40, 500), ctx(1, 3000), ctx(8, 1500, 9000)]


def best_arm(c: StepContext, **drift) -> PlanKind:
    return min(arms_for(c), key=lambda a: true_head_ms(c, a, **drift))


def simulate(policy, steps: int, *, seed: int = 0, drift_at: int | None = None, drift: dict | None = None):
    """Run `steps` decode steps on contexts drawn uniformly from CONTEXTS. Returns per step: the context
    index, whether the true best arm was chosen, and the regret (ms above the best arm's mean)."""
    rng = np.random.default_rng(seed)
    which, correct, regret = [], [], []
    for t in range(steps):
        i = int(rng.integers(len(CONTEXTS)))
        c = CONTEXTS[i]
        costs = drift if drift_at is not None and t >= drift_at else {}
        means = {a: true_head_ms(c, a, **costs) for a in arms_for(c)}
        best = min(means, key=means.get)
        arm = policy.choose(c, arms_for(c))
        latency = means[arm] * (1 + 0.03 * rng.standard_normal()) + 0.02 * rng.standard_normal()
        if rng.random() < 0.01:
            latency += 30.0  # a GC pause
        policy.update(c, arm, latency)
        which.append(i)
        correct.append(arm is best)
        regret.append(means[arm] - means[best])
    return np.array(which), np.array(correct), np.array(regret)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQP_CACHE_DIR", str(tmp_path))


# -- (e) the roofline prior alone ----------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "gpu", "NVIDIA H100 80GB HBM3", "tpu"])
def test_roofline_prior_picks_sensible_plans(device):
    for policy in (RooflinePolicy(roofline_for(device)), LinUCBPolicy(roofline_for(device))):
        assert policy.choose(ctx(1, 5, device=device), [DENSE, SPARSE]) is SPARSE
        assert policy.choose(ctx(1, V - 100, device=device), [DENSE, SPARSE]) is DENSE
        assert policy.choose(ctx(1, V, device=device), [DENSE, SPARSE]) is DENSE
        # rows sharing their allowed ids: one union gather beats B gathers
        assert policy.choose(ctx(16, 300, 300, device=device), [DENSE, SPARSE, UNION]) is UNION
        # unconstrained batch: the dense head is read once for all rows
        assert policy.choose(ctx(16, V, V, device=device), [DENSE, SPARSE, UNION]) is DENSE


def test_roofline_prior_crossover_falls_with_batch():
    planner = Planner("m", "cpu")
    crossings = [planner.crossover_k(b, V, D) for b in (1, 4, 16)]
    assert crossings == sorted(crossings, reverse=True) and crossings[0] > crossings[-1]
    assert 1 < crossings[-1] and crossings[0] <= V


def test_forced_and_single_arms_need_no_decision():
    policy = LinUCBPolicy(roofline_for("cpu"))
    assert policy.choose(ctx(1, 1), [PlanKind.FORCED]) is PlanKind.FORCED
    assert policy.choose(ctx(4, 1), [DENSE, PlanKind.FORCED]) is PlanKind.FORCED
    assert policy.choose(ctx(1, V), [DENSE]) is DENSE
    before = policy.theta.copy()
    policy.update(ctx(1, 1), PlanKind.FORCED, 3.0)
    policy.update(ctx(1, 5), SPARSE, float("nan"))
    np.testing.assert_array_equal(policy.theta, before)
    with pytest.raises(ValueError, match="auto"):
        policy.choose(ctx(1, 5), [DENSE, PlanKind.AUTO])
    with pytest.raises(ValueError):
        policy.choose(ctx(1, 5), [])


# -- (a), (b) a stationary environment -----------------------------------------------------------------

def test_simulation_prior_is_wrong_somewhere():
    """Guards the tests below: the environment must make the prior pick wrong, or nothing is learned."""
    prior = RooflinePolicy(roofline_for("cpu"))
    wrong = [c for c in CONTEXTS if prior.choose(c, arms_for(c)) is not best_arm(c)]
    assert len(wrong) >= 2


@functools.cache
def stationary_run(seed: int, steps: int = 4000):
    """One seeded run of a fresh bandit in the stationary environment, shared by the tests below."""
    return simulate(LinUCBPolicy(roofline_for("cpu"), BanditConfig(seed=seed)), steps, seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regret_grows_sublinearly(seed):
    which, _, regret = stationary_run(seed)
    steps = len(regret)
    first, second = regret[: steps // 2].sum(), regret[steps // 2:].sum()
    assert first > 0  # it had to learn
    assert second < 0.1 * first
    per_step = [regret[:t].sum() / t for t in (500, 1000, 2000, 4000)]
    assert all(a > b for a, b in zip(per_step, per_step[1:])), per_step
    # and learning pays: the prior alone keeps paying for its wrong picks on the same steps
    prior = RooflinePolicy(roofline_for("cpu"))
    prior_regret = sum(true_head_ms(CONTEXTS[i], prior.choose(CONTEXTS[i], arms_for(CONTEXTS[i])))
                       - true_head_ms(CONTEXTS[i], best_arm(CONTEXTS[i])) for i in which)
    assert regret.sum() < 0.15 * prior_regret


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choices_converge_to_the_best_arm_in_every_context(seed):
    which, correct, _ = stationary_run(seed)
    tail = slice(int(0.8 * len(which)), len(which))
    for i, c in enumerate(CONTEXTS):
        picks = correct[tail][which[tail] == i]
        assert len(picks) > 50
        assert picks.mean() >= 0.95, (c, picks.mean())


def test_learned_crossover_matches_the_environment():
    planner = Planner("m", "cpu")
    simulate(planner, 4000)
    for batch in (1, 4, 16):
        true_crossover = next((lower + 1 for lower, k in zip([0] + k_buckets(V), k_buckets(V))
                               if true_head_ms(ctx(batch, k), DENSE) <= true_head_ms(ctx(batch, k), SPARSE)), V + 1)
        assert planner.crossover_k(batch, V, D) == true_crossover
    k = planner.crossover_k(1, V, D)
    assert planner.predict_ms(ctx(1, k - 1), [DENSE, SPARSE]).argmin() == 1
    assert planner.predict_ms(ctx(1, k), [DENSE, SPARSE]).argmin() == 0


# -- (c) drift -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("drift, settle", [
    ({"dense_scale": 0.25}, 500),   # an idle arm got cheaper: found again by the widening confidence bound
    ({"sparse_scale": 4.0}, 300),   # the chosen arm got slower: seen directly in its own measurements
])
def test_readapts_after_drift(drift, settle):
    steps, change = 4000, 2000
    policy = LinUCBPolicy(roofline_for("cpu"))
    which, correct, regret = simulate(policy, steps, drift_at=change, drift=drift)
    changed = [i for i, c in enumerate(CONTEXTS) if best_arm(c) is not best_arm(c, **drift)]
    assert changed, "the drift must change the best arm somewhere"
    after = np.arange(steps) >= change + settle
    for i in changed:
        picks = correct[after & (which == i)]
        assert picks.mean() >= 0.9, (CONTEXTS[i], picks.mean())
    # what staying with the pre-drift choices would have cost over the same steps
    stale = sum(true_head_ms(CONTEXTS[i], best_arm(CONTEXTS[i]), **drift)
                - true_head_ms(CONTEXTS[i], best_arm(CONTEXTS[i], **drift), **drift) for i in which[after])
    assert regret[after].sum() < 0.1 * stale


# -- determinism and cost ------------------------------------------------------------------------------

def test_deterministic_given_seed_even_with_probes():
    runs = [simulate(LinUCBPolicy(roofline_for("cpu"), BanditConfig(seed=7, probe_rate=0.05)), 600)[1]
            for _ in range(2)]
    np.testing.assert_array_equal(*runs)
    other = simulate(LinUCBPolicy(roofline_for("cpu"), BanditConfig(seed=8, probe_rate=0.05)), 600)[1]
    assert not np.array_equal(runs[0], other)  # the seed does drive the probes


def test_choose_is_cheap():
    """choose() runs every decode step: context construction included, it must stay a few small numpy
    ops (~10–20 µs). CPU time, best of several repeats, so a busy test machine does not fail it."""
    policy = LinUCBPolicy(roofline_for("cpu"))
    simulate(policy, 200)
    arms = [DENSE, SPARSE, UNION]
    timings = []
    for _ in range(7):
        start = time.process_time()
        for _ in range(1000):
            policy.choose(StepContext(k_max=300, k_mean=120.0, k_union=700, batch_size=8, vocab_size=V,
                                      hidden_size=D, device_kind="cpu"), arms)
        timings.append((time.process_time() - start) / 1000)
    assert min(timings) < 50e-6, f"choose took {min(timings) * 1e6:.1f} µs"


def test_context_from_allowed_rows():
    rows = [np.array([1, 2, 3]), np.array([3, 4]), None]
    c = StepContext.from_allowed(rows[:2], batch_size=4, vocab_size=10, hidden_size=8)
    assert (c.k_max, c.k_mean, c.k_union, c.batch_size) == (3, 2.5, 4, 4)
    c = StepContext.from_allowed(rows, vocab_size=10, hidden_size=8)
    assert (c.k_max, c.k_union, c.batch_size) == (10, 10, 3)
    x = c.features()
    assert x.shape == (7,) and x[0] == 1.0 and np.all(np.isfinite(x))


def test_planner_skips_the_first_measurement_of_each_shape():
    """The first step of each (plan, shape) in a process includes its XLA compile: not a plan's speed."""
    planner = Planner("m", "cpu")
    planner.update(ctx(1, 5), SPARSE, 400.0)
    assert planner.policy.counts.sum() == 0
    planner.update(ctx(1, 7), SPARSE, 0.5)  # same K bucket (8): counted
    planner.update(ctx(1, 7), DENSE, 300.0)  # another plan: compiles again
    planner.update(ctx(1, 100), SPARSE, 300.0)  # another K bucket: compiles again
    assert planner.policy.counts.tolist() == [0, 1, 0]


# -- (d) persistence -----------------------------------------------------------------------------------

def test_persistence_round_trip_continues_identically(tmp_path):
    config = BanditConfig(seed=3, probe_rate=0.05)
    planner = Planner.load("HuggingFaceTB/SmolLM2-135M-Instruct", "cpu", config=config)
    assert planner.policy.counts.sum() == 0
    simulate(planner, 500, seed=1)
    path = planner.save()
    assert path == state_path("HuggingFaceTB/SmolLM2-135M-Instruct", "cpu")
    assert path.parent == tmp_path / "planner" and "/" not in path.name
    assert json.loads(path.read_text())["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    loaded = Planner.load("HuggingFaceTB/SmolLM2-135M-Instruct", "cpu")
    assert loaded.policy.config == config
    np.testing.assert_allclose(loaded.policy.theta, planner.policy.theta)
    np.testing.assert_allclose(loaded.policy.a_inv, planner.policy.a_inv)
    np.testing.assert_array_equal(loaded.policy.counts, planner.policy.counts)
    assert loaded.crossover_k(4, V, D) == planner.crossover_k(4, V, D)
    # same state + same RNG state: the two continue step for step
    a, b = simulate(planner, 300, seed=2), simulate(loaded, 300, seed=2)
    np.testing.assert_array_equal(a[1], b[1])


def test_describe_reports_counts_and_crossovers():
    planner = Planner.load("m", "cpu")
    assert "no step seen yet" in planner.describe()
    simulate(planner, 800)
    text = planner.describe()
    counts = planner.policy.counts
    assert f"observations: {counts.sum()} (dense {counts[0]}, sparse {counts[1]}, sparse_union {counts[2]})" in text
    for b in (1, 4, 16):
        assert f"B={b}: {planner.crossover_k(b, V, D)}" in text
    assert re.search(r"B=1: +sparse K ≤ \d+ · dense K > \d+", text)
    assert re.search(r"B=16, shared ids: +.*sparse_union", text)


def test_reset_deletes_state_files():
    for model, device in [("a", "cpu"), ("a", "gpu"), ("b", "cpu")]:
        planner = Planner.load(model, device)
        planner.update(ctx(1, 5), SPARSE, 0.5)
        planner.save()
    assert sorted((p.model_name, p.device_kind) for p in saved()) == [("a", "cpu"), ("a", "gpu"), ("b", "cpu")]
    assert reset(model_name="a", device_kind="gpu") == [state_path("a", "gpu")]
    assert [p.name for p in reset(device_kind="cpu")] == [state_path("a", "cpu").name, state_path("b", "cpu").name]
    assert saved() == []
    assert Planner.load("a", "cpu").policy.counts.sum() == 0
    assert reset() == []


def test_unreadable_or_foreign_state_starts_fresh():
    path = state_path("m", "cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring planner state .*: it is not JSON"):
        planner = Planner.load("m", "cpu")
    assert planner.policy.counts.sum() == 0
    planner.update(ctx(1, 5), SPARSE, 0.5)
    doc = json.loads(planner.save().read_text())
    doc["state"]["coords"] = doc["state"]["coords"][:-1]  # written by another feature layout
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning):
        assert Planner.load("m", "cpu").policy.counts.sum() == 0
    assert reset() == [path]


def test_state_is_keyed_by_model_device_and_dtype():
    f32 = Planner.load("m", "cpu")
    assert f32.dtype == "float32" and f32.path == state_path("m", "cpu", "float32")
    bf16 = Planner.load("m", "cpu", dtype="bfloat16")
    assert bf16.path == state_path("m", "cpu", "bfloat16") != f32.path
    for _ in range(3):
        bf16.update(ctx(1, 5), SPARSE, 0.5)
    bf16.save()
    assert Planner.load("m", "cpu", dtype="bfloat16").policy.counts.tolist() == [0, 2, 0]
    assert Planner.load("m", "cpu").policy.counts.sum() == 0  # float32 learned nothing
    assert "m on cpu, bfloat16" in Planner.load("m", "cpu", dtype="bfloat16").describe()
    assert [(p.model_name, p.dtype) for p in saved()] == [("m", "bfloat16")]
    assert reset(dtype="float32") == [] and reset(dtype="bfloat16") == [bf16.path]


def _updated(planner: Planner, n: int, k: int = 5, arm=SPARSE) -> Planner:
    for i in range(n + 1):  # the first measurement of a shape is skipped (compile time)
        planner.update(ctx(1, k), arm, 0.5 + 0.01 * i)
    return planner


def test_interleaved_saves_merge_instead_of_losing_updates():
    a = Planner.load("m", "cpu")
    b = Planner.load("m", "cpu")
    _updated(b, 7, arm=DENSE).save()
    _updated(a, 5).save()  # a read the file before b saved: a's save must keep b's 7 dense steps
    assert Planner.load("m", "cpu").policy.counts.tolist() == [7, 5, 0]
    assert a.policy.counts.tolist() == [7, 5, 0]  # a adopted the merge
    _updated(b, 3, k=100).save()  # and b merges a's steps in turn
    merged = Planner.load("m", "cpu")
    assert merged.policy.counts.tolist() == [7, 8, 0]
    assert np.all(np.linalg.eigvalsh(merged.policy.a_data) > -1e-9)  # still a valid regression state


def test_merge_discounts_the_other_engines_data_as_if_applied_first():
    # a saves 20 updates; b, which read the file before, saves 20 others: the merged per-arm discounted
    # observation counts are those of one policy that saw a's updates and then b's.
    rng = np.random.default_rng(0)
    steps = [(ctx(1, int(k)), DENSE if k > 1000 else SPARSE, float(ms))
             for k, ms in zip(rng.integers(1, 30000, 40), rng.uniform(0.4, 6.0, 40))]
    a, b = Planner("m", "cpu"), Planner("m", "cpu")
    sequential = LinUCBPolicy(roofline_for("cpu"))
    for c, arm, ms in steps[:20]:
        a.policy.update(c, arm, ms)
    for c, arm, ms in steps[20:]:
        b.policy.update(c, arm, ms)
    for c, arm, ms in steps:
        sequential.update(c, arm, ms)
    a.save()
    b.save()
    np.testing.assert_array_equal(b.policy.counts, sequential.counts)
    np.testing.assert_allclose(b.policy.recent, sequential.recent, rtol=1e-12)
    assert b.policy.noise_weight == pytest.approx(sequential.noise_weight, rel=1e-12)
    np.testing.assert_array_equal(Planner.load("m", "cpu").policy.counts, sequential.counts)


def _save_after_updates(cache_dir: str, n_updates: int, arm_index: int, barrier) -> None:
    import os

    os.environ["LLMQP_CACHE_DIR"] = cache_dir
    planner = Planner.load("m", "cpu")
    _updated(planner, n_updates, arm=[DENSE, SPARSE][arm_index])
    barrier.wait()  # every process saves at the same moment
    planner.save()


def test_processes_saving_at_once_lose_no_update(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    n_procs, n_updates = 4, 25
    barrier = spawn.Barrier(n_procs)
    procs = [spawn.Process(target=_save_after_updates, args=(str(tmp_path), n_updates, i % 2, barrier))
             for i in range(n_procs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n_procs
    counts = Planner.load("m", "cpu").policy.counts.tolist()
    assert counts == [2 * n_updates, 2 * n_updates, 0]  # every process's updates are in the file


def _edited(**changes):
    return lambda text: json.dumps({**json.loads(text), **changes})


@pytest.mark.parametrize("corrupt, reason", [
    (lambda text: "{not json", "is not JSON"),
    (lambda text: text[: len(text) // 2], "is not JSON"),  # truncated
    (lambda text: "[1, 2]", "is not a JSON object"),
    (_edited(format=1), "has format 1"),
    (_edited(model="other"), "belongs to"),  # e.g. two model names that map to the same file name
    (_edited(dtype="bfloat16"), "belongs to"),
    (lambda text: json.dumps({**json.loads(text), "state": {**json.loads(text)["state"], "a_data": [[1.0]]}}),
     "malformed"),
])
def test_corrupt_or_foreign_state_is_replaced_with_a_warning(corrupt, reason):
    path = _updated(Planner.load("m", "cpu"), 4).save()
    path.write_text(corrupt(path.read_text()))
    with pytest.warns(UserWarning, match=f"ignoring planner state .*{reason}"):
        fresh = Planner.load("m", "cpu")
    assert fresh.policy.counts.sum() == 0
    _updated(fresh, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already announced at load: the save replaces it quietly
        fresh.save()
    assert Planner.load("m", "cpu").policy.counts.tolist() == [0, 2, 0]


def test_state_corrupted_after_load_is_replaced_at_save_with_a_warning():
    planner = _updated(Planner.load("m", "cpu"), 3)
    path = state_path("m", "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("garbage")
    with pytest.warns(UserWarning, match="replacing planner state .*is not JSON"):
        planner.save()
    assert Planner.load("m", "cpu").policy.counts.tolist() == [0, 3, 0]
