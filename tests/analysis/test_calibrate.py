"""Calibration (dfsviz.analysis.calibrate): allocation against brute force and by property, predictions
recomputed independently from a capture with select_topk / block_recall, the replay against
replay_schedule, the config round trip, every refusal, the time on the sample, and the plumbing check:
a calibrated config applied to the embedded model measures the recall the calibration predicted."""

from __future__ import annotations

import itertools
import math

import h5py
import pytest
import torch

import dfsviz
from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.accel.plan import CalibratedPlan, gamma_for_count
from dfsviz.analysis.calibrate import CalibrationConfig, allocate_max_recall, allocate_target, calibrate
from dfsviz.analysis.curves import RecallCurve
from dfsviz.analysis.drift import mask_source_step, replay_schedule
from dfsviz.analysis.sweeps import write_token_model_capture
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.schedule import DFSSchedule
from dfsviz.sparse.stats import block_recall
from dfsviz.sparse.tokenmodel import TokenModelConfig

ORDER, METHOD = "hilbert3d", "dfs_tile"


@pytest.fixture(scope="module")
def sample():
    return dfsviz.sample_capture()


@pytest.fixture(scope="module")
def chosen(sample):
    """Free search (warm-up, interval, method) at target 0.9 on the shipped sample."""
    return calibrate(sample, CalibrationConfig(target_recall=0.9))


@pytest.fixture(scope="module")
def fixed(sample):
    """Warm-up 6, interval 8, dfs_tile: the sparse steps 6..19 reuse a mask for up to 7 steps."""
    return calibrate(sample, CalibrationConfig(target_recall=0.9, warmup_steps=6, interval=8, method=METHOD))


def token_capture(path, *, grid=LatentGrid(2, 8, 16), heads=2, **kw):
    args = dict(num_steps=10, steps=(0, 3, 6, 9), layers=2, orders=(ORDER,), methods=(METHOD,), block=32,
                footprints=0)
    args.update(kw)
    return write_token_model_capture(path, TokenModelConfig(grid, heads=heads, head_dim=16), **args)


# ------------------------------------------------------------------------ allocation
def _concave(heads: int, mk: int, seed: int) -> torch.Tensor:
    """Random increasing concave curves [heads, mk] ending at 1."""
    g = torch.Generator().manual_seed(seed)
    gains = torch.rand(heads, mk, generator=g, dtype=torch.float64).sort(dim=-1, descending=True).values
    return torch.cumsum(gains, dim=-1) / gains.sum(dim=-1, keepdim=True)


def _curve(recall: torch.Tensor, density: torch.Tensor | None = None) -> RecallCurve:
    """A curve of blocks of 16 tokens whose N fills them (every block costs the same density)."""
    mk = recall.shape[-1]
    if density is None:
        density = (torch.arange(1, mk + 1, dtype=torch.float64) / mk).expand(recall.shape).contiguous()
    return RecallCurve(recall, density, 16 * mk, 16)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k_min", [1, 2])
def test_greedy_equals_brute_force_on_concave_curves(seed, k_min):
    heads, mk = 3, 5
    recall = _concave(heads, mk, seed)
    curve = _curve(recall)  # equal cost per block
    density = curve.density
    for blocks in range(heads * k_min, heads * mk + 1):
        budget = blocks / mk
        k = allocate_max_recall(curve, budget, k_min)
        best = max(sum(float(recall[h, c[h] - 1]) for h in range(heads))
                   for c in itertools.product(range(k_min, mk + 1), repeat=heads)
                   if sum(c) / mk <= budget + 1e-12)
        got = sum(float(recall[h, k[h] - 1]) for h in range(heads))
        assert got == pytest.approx(best, abs=1e-12), (blocks, k.tolist())
        assert float(density[torch.arange(heads), k - 1].sum()) <= budget + 1e-9
    assert allocate_max_recall(curve, heads * k_min / mk - 0.01, k_min) is None


def test_greedy_on_a_non_concave_curve_lands_on_the_curve():
    """Head 0 gains nothing from its 2nd block and a lot from its 3rd: the hull jumps 1 -> 3."""
    recall = torch.tensor([[0.1, 0.1, 0.9, 1.0], [0.5, 0.7, 0.85, 1.0]], dtype=torch.float64)
    curve = _curve(recall)
    k = allocate_max_recall(curve, 0.75 + 0.5, 1)
    assert k.tolist() == [3, 2]  # head 0 takes the two-block hull segment (0.8 / 0.5) before head 1's 2nd block
    k = allocate_max_recall(curve, 0.25 + 0.25 + 0.25, 1)
    assert k.tolist() == [1, 2]  # the hull segment of head 0 does not fit: head 1 gets the budget left


def test_allocate_target_is_the_smallest_sufficient_k():
    recall = _concave(4, 9, 0)
    for target in (0.2, 0.5, 0.9, 1.0):
        for k_min in (1, 3):
            k = allocate_target(_curve(recall), target, k_min)
            for h in range(4):
                want = next((j for j in range(k_min, 10) if recall[h, j - 1] >= target - 1e-9), 9)
                assert int(k[h]) == want
    ks = [allocate_target(_curve(recall), t) for t in (0.3, 0.6, 0.8, 0.95)]
    assert all(bool((a <= b).all()) for a, b in zip(ks, ks[1:]))


# ------------------------------------------------------------------------ predictions on the sample
def _predicted(reader, layer, head, gamma, warmup, interval):
    """The documented prediction recomputed with select_topk (reader.mask) and block_recall."""
    steps = [t for t in reader.steps if t >= warmup]
    fresh = {t: float(reader.recall(t, layer, ORDER, METHOD, gamma=gamma)[0, head]) for t in steps}
    ratios = {}
    for s, t in itertools.combinations(steps, 2):
        cached = block_recall(reader.block_mass(t, layer, ORDER), reader.mask(s, layer, ORDER, METHOD, gamma=gamma))
        ratios.setdefault(t - s, []).append(float(cached[0, head]) / fresh[t])
    oldest = min(interval, 20 - warmup) - 1
    # Linear between captured lags (1 at lag 0) never dips below its end points: the minimum over
    # lags 0..oldest is over the captured lags <= oldest and the interpolated value at `oldest`.
    points = {0: 1.0, **{d: min(1.0, sum(v) / len(v)) for d, v in ratios.items()}}
    lo, hi = max(d for d in points if d <= oldest), min(d for d in points if d >= oldest)
    at_oldest = points[lo] if lo == hi else points[lo] + (points[hi] - points[lo]) * (oldest - lo) / (hi - lo)
    reuse = min([at_oldest] + [v for d, v in points.items() if d <= oldest])
    density = sum(float(reader.density(t, layer, ORDER, METHOD, gamma=gamma)[0, head]) for t in steps) / len(steps)
    return sum(fresh.values()) / len(fresh) * reuse, density


def test_predictions_recomputed_independently(fixed, sample):
    plan = fixed.plan
    assert (plan.warmup_steps, plan.interval, plan.method, plan.order) == (6, 8, METHOD, ORDER)
    mk = plan.num_kv_blocks
    with dfsviz.open(sample) as reader:
        checked = 0
        for lb in plan.layers[::3]:
            for head, (gamma, k) in enumerate(zip(lb.gamma, lb.kept_blocks)):
                if gamma is None:
                    # dense: even the largest affordable budget (floor(0.85 * Mk) blocks) misses the target
                    cap = gamma_for_count(math.floor(0.85 * mk), mk)
                    assert _predicted(reader, lb.layer, head, cap, 6, 8)[0] < 0.9
                    assert lb.predicted_recall[head] == 1.0 and lb.density[head] == 1.0
                    continue
                recall, density = _predicted(reader, lb.layer, head, gamma, 6, 8)
                assert lb.predicted_recall[head] == pytest.approx(recall, abs=2e-6)
                assert lb.density[head] == pytest.approx(density, abs=1e-12)
                assert recall >= 0.9 - 1e-9
                if k > 1:  # one block fewer misses the target: the smallest sufficient budget
                    assert _predicted(reader, lb.layer, head, gamma_for_count(k - 1, mk), 6, 8)[0] < 0.9
                checked += 1
    assert checked >= 3


def test_every_sparse_head_reaches_the_target(chosen):
    plan, p = chosen.plan, chosen.plan.predicted
    heads = [(g, r, d) for lb in plan.layers for g, r, d in zip(lb.gamma, lb.predicted_recall, lb.density)]
    assert all(r >= 0.9 - 1e-9 for g, r, d in heads if g is not None)
    assert all((r, d) == (1.0, 1.0) for g, r, d in heads if g is None)
    assert 0 < sum(g is None for g, _, _ in heads) < len(heads)
    assert p["mean_recall"] == pytest.approx(sum(r for _, r, _ in heads) / len(heads))
    assert p["mean_density"] == pytest.approx(sum(d for _, _, d in heads) / len(heads))
    # the chosen plan has the least attention work of the feasible candidates of its method, and of every method
    assert p["attention_work"] == pytest.approx(min(c["attention_work"] for c in chosen.candidates))
    assert all(m is None or m["attention_work"] >= p["attention_work"] - 1e-12 for m in p["methods"].values())
    assert set(p["methods"]) == {"meanpool", "dfs_tile", "antidiagonal"}
    assert plan.tile == {"meanpool": None, "dfs_tile": 16, "antidiagonal": 8}[plan.method]


def test_allocation_is_monotone_in_target(sample):
    fixed_ks, works = [], []
    for target in (0.7, 0.8, 0.9, 0.95):
        r = calibrate(sample, CalibrationConfig(target_recall=target, warmup_steps=6, interval=8, method=METHOD))
        fixed_ks.append(torch.tensor([lb.kept_blocks for lb in r.plan.layers]))
        works.append(calibrate(sample, CalibrationConfig(target_recall=target, method=METHOD)).plan.predicted["attention_work"])
    assert all(bool((a <= b).all()) for a, b in zip(fixed_ks, fixed_ks[1:]))
    assert works == sorted(works) and works[0] < works[-1]


def test_max_density_spends_at_most_its_budget(sample):
    recalls = []
    for budget in (0.3, 0.5, 0.7):
        p = calibrate(sample, CalibrationConfig(max_density=budget, method=METHOD)).plan.predicted
        assert p["attention_work"] <= budget + 1e-9
        recalls.append(p["run_recall"])
    assert recalls == sorted(recalls) and recalls[0] < recalls[-1]


def test_replay_matches_replay_schedule(fixed, sample):
    """The plan replayed from the calibration's curves equals drift.replay_schedule with select_topk masks."""
    plan, replay = fixed.plan, fixed.replay[0]
    schedule = plan.schedule()
    assert replay["steps"] == [0, 6, 13, 19] and replay["mask_step"] == [None, 6, 6, 14]
    assert [mask_source_step(DFSSchedule(num_steps=20, skip_steps=6, interval=8, gamma0=1.0, decrement=0.0,
                                         dense_layers=()), t) for t in replay["steps"]] == replay["mask_step"]
    assert [schedule.at_step(t).dense for t in replay["steps"]] == [True, False, False, False]
    steps = [0, 6, 13]  # 19 reuses the mask of the uncaptured step 14
    with dfsviz.open(sample) as reader:
        for li, lb in enumerate(plan.layers):
            masses = [reader.block_mass(t, lb.layer, ORDER) for t in steps]
            scores = [reader.scores(t, lb.layer, ORDER, METHOD) for t in steps]
            for gamma in {g for g in lb.gamma if g is not None}:
                heads = [h for h, g in enumerate(lb.gamma) if g == gamma]
                rp = replay_schedule(DFSSchedule(num_steps=20, skip_steps=6, interval=8, gamma0=gamma, decrement=0.0,
                                                 dense_layers=()), steps, masses, scores, layer=lb.layer,
                                     seq_len=reader.grid.num_tokens, block=reader.block)
                for i in range(3):
                    got = replay["recall"][i, li, heads]
                    torch.testing.assert_close(got, rp.recall_cached[i, 0, heads], atol=2e-6, rtol=0)
            assert bool(torch.isnan(replay["recall"][3, li][[g is not None for g in lb.gamma]]).all())
    assert plan.predicted["replay"][0]["recall"][3] is None


def test_drift_at_the_chosen_budgets(fixed):
    drift = fixed.plan.predicted["drift"]
    assert drift["lags"] == [0, 6, 7, 13] and drift["relative_recall"][0] == pytest.approx(1.0)
    assert drift["interval"] == 8 and all(0.5 < r <= 1.5 for r in drift["relative_recall"])


def test_round_trip_and_time(chosen, tmp_path, sample):
    path = chosen.save(tmp_path / "dfsattn.json")
    back = CalibratedPlan.load(path)
    assert back.to_json() == chosen.plan.to_json()
    config = DFSConfig.load(path)
    assert config.calibration.to_json() == chosen.plan.to_json() and config.score_method == chosen.plan.method
    prov = back.provenance
    assert prov["target_recall"] == 0.9 and prov["captures"][0]["path"] == str(sample)
    assert back.model.id == "dfsviz-embedded:tiny-wan" and back.model.config["num_layers"] == 8
    assert back.dfsviz_version == dfsviz.__version__
    assert chosen.seconds < 60, f"calibrating the sample took {chosen.seconds:.1f} s"


def test_pooled_captures_report_their_spread(tmp_path):
    a = token_capture(tmp_path / "a.h5")
    b = token_capture(tmp_path / "b.h5", grid=LatentGrid(2, 8, 16))  # same model, same seed: identical clips
    one = calibrate(a, CalibrationConfig(target_recall=0.8)).plan
    two = calibrate([a, b], CalibrationConfig(target_recall=0.8)).plan
    assert [lb.gamma for lb in two.layers] == [lb.gamma for lb in one.layers]
    assert all(len(r) == 2 and r[0] == pytest.approx(r[1]) for lb in two.layers for r in lb.recall_by_clip)
    assert len(two.provenance["captures"]) == 2


# ------------------------------------------------------------------------ refusals
def _model_id(path) -> str:
    with h5py.File(path, "r") as f:
        return f.attrs["model_id"]


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return token_capture(tmp_path_factory.mktemp("cal_base") / "base.h5")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: token_capture(d / "x.h5", heads=3), r"captures of different heads cannot be pooled: '.*base.h5' has "
                                                        r"\[0, 1\], '.*x.h5' has \[0, 1, 2\]"),
        (lambda d: token_capture(d / "x.h5", layers=3), r"captures of different layers cannot be pooled"),
        (lambda d: token_capture(d / "x.h5", block=16), r"captures of different blocks cannot be pooled: .* has 32, .* has 16"),
        (lambda d: token_capture(d / "x.h5", num_steps=12), r"captures of different numbers of steps cannot be pooled: "
                                                             r".* has 10, .* has 12"),
        (lambda d: _edit(token_capture(d / "x.h5", grid=LatentGrid(2, 8, 8)),
                         lambda f: f.attrs.__setitem__("model_id", _model_id(d / "base.h5"))),
         r"captures of different grids cannot be pooled: '.*base.h5' has f2h8w16, '.*x.h5' has f2h8w8; calibrate each"),
        (lambda d: token_capture(d / "x.h5", orders=("raster",)),
         r"the captures share no token order; capture them with the same --orders"),
        (lambda d: token_capture(d / "x.h5", methods=("meanpool",)),
         r"the captures share no scoring method other than the oracle \(the dense reference\); capture them with the "
         r"same --methods"),
        (lambda d: token_capture(d / "x.h5", tile=8),
         r"the captures scored with different tiles \(dfs_tile: \[16, 8\], capture by capture\)"),
        (lambda d: str(dfsviz.sample_capture()),
         r"captures of different models cannot be pooled: '.*base.h5' has token model, grid f2h8w16.* \(TokenModel\), "
         r"'.*tiny-wan-sample.h5' has dfsviz-embedded:tiny-wan \(WanTransformer3DModel\)"),
    ],
)
def test_refuses_to_pool(base, tmp_path, make, match):
    import shutil

    shutil.copy(base, tmp_path / "base.h5")
    other = make(tmp_path)
    with pytest.raises(ValueError, match=match):
        calibrate([tmp_path / "base.h5", other], CalibrationConfig(target_recall=0.9))


@pytest.mark.parametrize(
    "make, config, match",
    [
        (lambda d: token_capture(d / "one.h5", steps=(5,)), dict(target_recall=0.9),
         r"capture '.*one.h5' has one captured step \(5\); calibration needs at least two captured steps for drift"),
        (lambda d: _edit(token_capture(d / "x.h5"), lambda f: [g.attrs.__setitem__("complete", False)
                                                                for g in f["steps"].values()]),
         dict(target_recall=0.9), r"capture '.*x.h5' holds no completed step"),
        (lambda d: _edit(token_capture(d / "x.h5"), lambda f: [f.attrs.__setitem__(k, []) for k in ("methods", "score_methods")]),
         dict(target_recall=0.9), r"capture '.*x.h5' holds no block scores; capture with --methods dfs_tile"),
        (lambda d: token_capture(d / "x.h5"), dict(target_recall=1.0),
         r"target recall 1 cannot be met by any sparse budget: every \(layer, head\) needs a kept fraction above "
         r"dense_above = 0.85"),
        (lambda d: token_capture(d / "x.h5"), dict(max_density=0.01),
         r"max density 0.01 cannot be met by any warm-up and interval: the smallest masks \(1 key block\(s\) per query "
         r"block\) have density 0.\d+"),
        (lambda d: token_capture(d / "x.h5"), dict(target_recall=0.9, order="raster"),
         r"`order` 'raster' is not in capture\(s\) \['.*x.h5'\]; captured orders: \['hilbert3d'\]"),
        (lambda d: token_capture(d / "x.h5"), dict(target_recall=0.9, method="meanpool"),
         r"`method` 'meanpool' is not in every capture; methods they all hold: \['dfs_tile'\]"),
        (lambda d: token_capture(d / "x.h5", steps=(0, 1, 2)), dict(target_recall=0.9, warmup_steps=0, interval=4),
         r"`interval` 4 reuses a mask for 3 steps, but the captures measure reuse over at most 2 steps from step 0"),
        (lambda d: token_capture(d / "x.h5", steps=(0, 1, 2)), dict(target_recall=0.9, warmup_steps=5),
         r"`warmup_steps` 5 leaves no captured step to calibrate on \(captured: \[0, 1, 2\]\)"),
        (lambda d: token_capture(d / "x.h5"), dict(target_recall=0.9, warmup_steps=10),
         r"`warmup_steps` must be below the 10 steps of the captured schedule \(got 10\)"),
        (lambda d: token_capture(d / "x.h5"), dict(target_recall=0.9, branch="uncond"),
         r"capture '.*x.h5' has branches \['cond'\], not 'uncond'"),
    ],
)
def test_refuses_what_it_cannot_calibrate(tmp_path, make, config, match):
    with pytest.raises(ValueError, match=match):
        calibrate(make(tmp_path), CalibrationConfig(**config))


def test_refuses_a_capture_twice_and_bad_arguments(base):
    with pytest.raises(ValueError, match=r"capture '.*base.h5' is listed twice; pool each capture once"):
        calibrate([base, base], CalibrationConfig(target_recall=0.9))
    with pytest.raises(TypeError, match=r"`config` must be a CalibrationConfig \(got dict\)"):
        calibrate(base, {"target_recall": 0.9})
    with pytest.raises(ValueError, match=r"`captures` must be one or more capture files"):
        calibrate([], CalibrationConfig(target_recall=0.9))
    with pytest.raises(TypeError, match=r"`captures` must hold file paths or CaptureReader objects \(got int\)"):
        calibrate([3], CalibrationConfig(target_recall=0.9))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(), ValueError, r"pass exactly one of `target_recall` \(recall every head keeps\) or `max_density`"),
        (dict(target_recall=0.9, max_density=0.3), ValueError, r"pass exactly one of `target_recall`"),
        (dict(target_recall=1.5), ValueError, r"`target_recall` must be a fraction in \(0, 1\] \(got 1.5\)"),
        (dict(max_density=0), ValueError, r"`max_density` must be a fraction in \(0, 1\] \(got 0\)"),
        (dict(target_recall=0.9, order=3), TypeError, r"`order` must be a str or None \(got int\)"),
        (dict(target_recall=0.9, branch="both"), ValueError, r"`branch` must be 'cond' or 'uncond' \(got 'both'\)"),
        (dict(target_recall=0.9, warmup_steps=-1), ValueError,
         r"`warmup_steps` must be an integer >= 0 \(got -1\); leave it out to have it chosen$"),
        (dict(target_recall=0.9, interval=0), ValueError,
         r"`interval` must be an integer >= 1 \(got 0\); leave it out to have it chosen$"),
        (dict(target_recall=0.9, dense_above=0), ValueError, r"`dense_above` must be a fraction in \(0, 1\]"),
        (dict(target_recall=0.9, refresh_cost=1.0), ValueError, r"`refresh_cost` must be in \[0, 1\)"),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CalibrationConfig(**kwargs)


# ------------------------------------------------------------------------ plumbing on the embedded model
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A capture of the embedded model (steps 0, 2, 3 of 4; layers 1 and 2) and the transformer inputs of
    every step it ran, recorded on the same model object."""
    from dfsviz.capture import CaptureConfig, load_model_source, run_capture

    out = tmp_path_factory.mktemp("cal_embedded") / "embedded.h5"
    cfg = CaptureConfig(out=str(out), num_steps=4, capture_steps=(0, 2, 3), layers=(1, 2), orders=(ORDER,),
                        methods=(METHOD,), footprints=0, device="cpu")
    source = load_model_source(cfg)
    calls = []

    def record(module, args, kwargs):
        calls.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
                     + ({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},))

    hook = source.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run_capture(cfg, progress=False, source=source)
    finally:
        hook.remove()
    return out, source.transformer, calls


def test_prediction_equals_measured_recall_on_the_same_clip(embedded, tmp_path):
    path, model, calls = embedded
    assert len(calls) == 4  # one transformer call per step (no CFG batch split), steps 0..3
    result = calibrate(path, CalibrationConfig(target_recall=0.8, warmup_steps=2))
    plan = result.plan
    sparse = [lb for lb in plan.layers if not lb.dense]
    assert plan.warmup_steps == 2 and sparse, plan.to_json()
    config = DFSConfig.load(result.save(tmp_path / "dfsattn.json"), measure_recall=True)
    with apply_dfsattn(model, config) as handle:
        handle.state.set_step(2)  # the first sparse step refreshes: its inputs equal the capture's
        with torch.no_grad():
            *args, kwargs = calls[2]
            model(*args, **kwargs)
    first = sparse[0]  # its input is the dense model's: layers before it keep the stock processor
    (record,) = [r for r in handle.state.records if r["layer"] == first.layer]
    assert record["refresh"] and record["gamma"] == first.gamma
    replay = result.replay[0]
    predicted = replay["recall"][replay["steps"].index(2), plan.layers.index(first)]
    torch.testing.assert_close(record["recall"][0], predicted, atol=2e-5, rtol=0)
    assert bool((predicted[[g is not None for g in first.gamma]] < 1).all())
