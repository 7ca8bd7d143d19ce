"""Krum, TrimmedMean and CR-MOGM against torchjd's aggregators, and COSMOS and PBI against torchjd's
scalarisers (their gradient with respect to the losses is our weights), on seeded random inputs; with the
properties that define each method."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

from mtlvision.balancers import GradientEngine, aggregate, get
from mtlvision.balancers.aggregate import MatrixGradients
from mtlvision.errors import ConfigError
from tests.balancers.test_reference_torchjd import KINDS, matrix

aggregation = pytest.importorskip("torchjd.aggregation")
scalarization = pytest.importorskip("torchjd.scalarization")


def rows(kind: str, seed: int, at_least: int) -> Tensor:
    """A seeded test matrix with at least ``at_least`` rows (more rows drawn and stacked if needed)."""
    g = matrix(kind, seed)
    while g.shape[0] < at_least:
        g = torch.cat([g, g + 0.1 * torch.randn(g.shape, generator=torch.Generator().manual_seed(seed), dtype=g.dtype)])
    return g


# ------------------------------------------------------------------------------------------ aggregators
def krum_selection_is_ambiguous(g: Tensor, n_byzantine: int, n_selected: int) -> bool:
    """Whether the ``n_selected``-th and next Krum scores tie (then either selection is Krum's): with
    ``T − f − 2 = 1`` neighbour, both rows of a nearest pair have the same score."""
    scores = torch.cdist(g, g).sort(dim=1).values[:, 1 : g.shape[0] - n_byzantine - 1].sum(dim=1).sort().values
    return n_selected < g.shape[0] and bool(torch.isclose(scores[n_selected - 1], scores[n_selected], rtol=1e-9))


@pytest.mark.parametrize(("n_byzantine", "n_selected"), [(0, 1), (1, 1), (1, 2), (2, 3)])
def test_krum_equals_torchjd(n_byzantine: int, n_selected: int) -> None:
    compared = 0
    for kind in KINDS:
        for seed in range(6):
            g = rows(kind, 100 * KINDS.index(kind) + seed, max(n_byzantine + 3, n_selected))
            if krum_selection_is_ambiguous(g, n_byzantine, n_selected):
                continue
            ours = aggregate("krum", g, n_byzantine=n_byzantine, n_selected=n_selected)
            theirs = aggregation.Krum(n_byzantine=n_byzantine, n_selected=n_selected)(g)
            assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
            compared += 1
    assert compared >= 15


@pytest.mark.parametrize("trim_number", [0, 1, 2])
def test_trimmed_mean_equals_torchjd(trim_number: int) -> None:
    for kind in KINDS:
        for seed in range(4):
            g = rows(kind, 200 * KINDS.index(kind) + seed, 2 * trim_number + 1)
            ours = aggregate("trimmed_mean", g, trim_number=trim_number)
            assert_close(ours, aggregation.TrimmedMean(trim_number=trim_number)(g), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("base", ["upgrad", "imtl_g", "dualproj"])
def test_cr_mogm_follows_torchjds_moving_average_over_steps(base: str) -> None:
    reference_weighting = {
        "upgrad": aggregation.UPGradWeighting,
        "dualproj": aggregation.DualProjWeighting,
        "imtl_g": aggregation.IMTLGWeighting,
    }[base]()
    theirs = aggregation.GramianWeightedAggregator(aggregation.CRMOGMWeighting(reference_weighting, alpha=0.7))
    ours = get("cr_mogm", base=base, alpha=0.7)
    generator = torch.Generator().manual_seed(7)
    for _step in range(4):
        g = torch.randn(3, 6, generator=generator, dtype=torch.float64) + 0.3
        update = ours.balance(torch.ones(3, dtype=torch.float64), MatrixGradients(g))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs(g)
        assert_close(update.weights @ g, expected, rtol=1e-9, atol=1e-9)


def test_cr_mogm_first_step_is_the_base_and_its_state_round_trips() -> None:
    generator = torch.Generator().manual_seed(3)
    steps = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    ones = torch.ones(3, dtype=torch.float64)
    smoothed = get("cr_mogm", alpha=0.5)
    assert_close(smoothed.balance(ones, MatrixGradients(steps[0])).weights @ steps[0], aggregate("upgrad", steps[0]))
    smoothed.balance(ones, MatrixGradients(steps[1]))
    buffer = io.BytesIO()
    torch.save(smoothed.state_dict(), buffer)
    buffer.seek(0)
    restored = get("cr_mogm", alpha=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for g in steps[2:]:
        assert_close(
            restored.balance(ones, MatrixGradients(g)).weights, smoothed.balance(ones, MatrixGradients(g)).weights
        )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(3, 7), n_byzantine=st.integers(0, 2))
def test_krum_selects_a_row_and_is_permutation_equivariant(seed: int, t: int, n_byzantine: int) -> None:
    if t < n_byzantine + 3:
        with pytest.raises(ConfigError, match="n_byzantine"):
            aggregate("krum", torch.randn(t, 4, dtype=torch.float64), n_byzantine=n_byzantine)
        return
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(t, 5, generator=generator, dtype=torch.float64)
    d = aggregate("krum", g, n_byzantine=n_byzantine)
    assert any(torch.equal(d, row) for row in g)  # Krum returns one of the gradients, unchanged
    perm = torch.randperm(t, generator=generator)
    if krum_selection_is_ambiguous(g, n_byzantine, 1):
        return  # a tie: the selected row depends on the order
    assert_close(aggregate("krum", g[perm], n_byzantine=n_byzantine), d)


def test_krum_discards_an_outlying_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    honest = torch.ones(5, 4, dtype=torch.float64) + 0.01 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
    g = torch.cat([honest, torch.full((1, 4), -100.0, dtype=torch.float64)])
    weights = get("krum", n_byzantine=1, n_selected=5).balance(torch.ones(6), MatrixGradients(g)).weights
    assert_close(weights, torch.tensor([0.2] * 5 + [0.0], dtype=weights.dtype))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(1, 7), trim=st.integers(0, 3))
def test_trimmed_mean_properties(seed: int, t: int, trim: int) -> None:
    g = torch.randn(t, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if t < 2 * trim + 1:
        with pytest.raises(ConfigError, match="trim_number"):
            aggregate("trimmed_mean", g, trim_number=trim)
        return
    d = aggregate("trimmed_mean", g, trim_number=trim)
    # within each coordinate's range, invariant to the task order, the mean when nothing is trimmed
    assert (d <= g.max(dim=0).values + 1e-12).all() and (d >= g.min(dim=0).values - 1e-12).all()
    assert_close(aggregate("trimmed_mean", g.flip(0), trim_number=trim), d)
    if trim == 0:
        assert_close(d, g.mean(dim=0))
    # one coordinate of one task pushed arbitrarily far moves the result by a bounded amount when trimmed
    if trim >= 1:
        far = g.clone()
        far[0, 0] = 1e12
        assert abs(float(aggregate("trimmed_mean", far, trim_number=trim)[0])) <= float(g[:, 0].abs().max()) + 1e-9


def test_robust_aggregators_pinned_values() -> None:
    g = torch.tensor([[1.0, 0.0], [0.9, 0.2], [1.1, -0.1], [-3.0, 4.0]], dtype=torch.float64)
    # scores (sum of distances to the T − 2 = 2 nearest others): 0.365, 0.584, 0.502, 7.65
    assert_close(aggregate("krum", g, n_byzantine=0), torch.tensor([1.0, 0.0], dtype=torch.float64))
    # per column, sorted and trimmed of one value at each end: mean(0.9, 1.0), mean(0.0, 0.2)
    assert_close(aggregate("trimmed_mean", g, trim_number=1), torch.tensor([0.95, 0.1], dtype=torch.float64))


def test_hyper_parameters_are_validated() -> None:
    for name, hparams in [
        ("krum", {"n_byzantine": -1}),
        ("krum", {"n_selected": 0}),
        ("trimmed_mean", {"trim_number": -1}),
        ("cr_mogm", {"alpha": 1.5}),
        ("cr_mogm", {"base": "graddrop"}),  # its update is not a weighted sum of the task gradients
        ("cr_mogm", {"base": "upgrad", "base_hparams": {"nonsense": 1}}),
        ("cosmos", {"lam": -0.1}),
        ("cosmos", {"pref_vector": [0.0, 0.0]}),
        ("pbi", {"theta": -1.0}),
        ("pbi", {"pref_vector": [1.0, -1.0]}),
    ]:
        with pytest.raises(ConfigError):
            get(name, **hparams)
    # refused when the trainer sets the balancer up, before the first step
    with pytest.raises(ConfigError, match=r"Krum needs at least 4 tasks \(n_byzantine \+ 3"):
        get("krum", n_byzantine=1).setup(3)
    with pytest.raises(ConfigError, match=r"TrimmedMean needs at least 5 tasks"):
        get("trimmed_mean", trim_number=2).setup(4)
    with pytest.raises(ConfigError, match="3 values but there are 2 tasks"):
        get("pbi", pref_vector=[1.0, 1.0, 1.0]).balance(torch.ones(2), None)


# -------------------------------------------------------------------------------------- scalarisations
def scalariser_gradient(scalariser: nn.Module, losses: Tensor) -> Tensor:
    values = losses.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(scalariser(values), values)
    return gradient


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    t=st.integers(1, 5),
    coefficient=st.floats(0.0, 8.0),
    with_prefs=st.booleans(),
    with_reference=st.booleans(),
)
def test_cosmos_and_pbi_weights_are_torchjds_scalarisation_gradient(
    seed: int, t: int, coefficient: float, with_prefs: bool, with_reference: bool
) -> None:
    generator = torch.Generator().manual_seed(seed)
    losses = torch.rand(t, generator=generator, dtype=torch.float64) * 3 + 0.05
    prefs = torch.rand(t, generator=generator, dtype=torch.float64) + 0.01 if with_prefs else None
    reference = -torch.rand(t, generator=generator, dtype=torch.float64) if with_reference else None
    hparams = {} if prefs is None else {"pref_vector": prefs.tolist()}

    cosmos = get("cosmos", lam=coefficient, **hparams).balance(losses, None).weights
    r = prefs if prefs is not None else torch.full((t,), 1.0 / t, dtype=torch.float64)
    assert_close(cosmos, scalariser_gradient(scalarization.COSMOS(lambda_=coefficient, weights=r), losses))

    pbi_hparams = {**hparams, **({} if reference is None else {"reference": reference.tolist()})}
    pbi = get("pbi", theta=coefficient, **pbi_hparams).balance(losses, None).weights
    w = prefs if prefs is not None else torch.ones(t, dtype=torch.float64)
    expected = scalariser_gradient(scalarization.PBI(theta=coefficient, weights=w, reference=reference), losses)
    assert_close(pbi, expected)


def test_scalarisations_pinned_values() -> None:
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # COSMOS, r = (½, ½), λ = 1: r − (r/(‖r‖‖L‖) − (rᵀL) L/(‖r‖‖L‖³)) with ‖r‖ = 1/√2, ‖L‖ = √5, rᵀL = 3/2,
    # i.e. r − (1/√10 − (3/(10√10))·(1, 2)) = r − (2/(5√10), −1/(5√10))
    assert_close(
        get("cosmos").balance(losses, None).weights,
        torch.tensor([0.5 - 0.1264911064, 0.5 + 0.0632455532], dtype=torch.float64),
    )
    # PBI, ŵ = (1, 1)/√2, θ = 5: d₁ = 3/√2, f − d₁ŵ = (−½, ½), d₂ = 1/√2
    expected = torch.tensor([2**-0.5 - 5 * 2**-0.5, 2**-0.5 + 5 * 2**-0.5], dtype=torch.float64)
    assert_close(get("pbi").balance(losses, None).weights, expected)


def test_cosmos_refuses_all_zero_losses() -> None:
    with pytest.raises(ConfigError, match="every task loss is 0"):
        get("cosmos").balance(torch.zeros(3), None)


@pytest.mark.parametrize("name", ["cosmos", "pbi"])
def test_scalarisation_through_the_engine_is_the_gradient_of_torchjds_objective(name: str) -> None:
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 6), nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])
    x = torch.randn(8, 4)

    def losses() -> Tensor:
        rep = torch.tanh(trunk(x))
        return torch.stack([(h(rep) - k).pow(2).mean() for k, h in enumerate(heads)])

    prefs = [0.2, 0.3, 0.5]
    balancer = get(name, pref_vector=prefs, **({"lam": 2.0} if name == "cosmos" else {"theta": 3.0}))
    GradientEngine(list(trunk.parameters()), list(heads.parameters())).backward(losses(), balancer)
    ours = [p.grad.clone() for p in [*trunk.parameters(), *heads.parameters()]]
    r = torch.tensor(prefs)
    objective = scalarization.COSMOS(2.0, r) if name == "cosmos" else scalarization.PBI(3.0, r)
    expected = torch.autograd.grad(objective(losses()), [*trunk.parameters(), *heads.parameters()])
    for a, b in zip(ours, expected):
        assert_close(a, b, rtol=1e-5, atol=1e-6)
