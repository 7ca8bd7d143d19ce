"""Per-layer gradients from activations (path ``jacobian="layers"``): every rule against plain autograd, the
activation-way Gramian against the Gram matrix of the weight gradients, and the engine against the vmapped
parameter path on models with repeated calls, tied weights, unused layers and in-place edits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlvision import balancers
from mtlvision.balancers import GradientEngine, LayerTaps, Needs, resolve_jacobian_path
from mtlvision.balancers.layers import Conv2dRule, LinearRule, rule_for
from mtlvision.errors import ConfigError
from tests.balancers.test_engine import Probe
from tests.engine.tinyrun import tiny_model
from tests.tolerance import assert_within_roundoff

#: the rules compute in float32 (``rows`` rounds A and B to it), whatever the layer's dtype
RULE_DTYPE = torch.float32


def per_task_autograd(module: nn.Module, x: Tensor, projections: Tensor) -> list[Tensor]:
    """[T, *shape] per parameter of ``module``: task t's loss is ⟨projections[t], module(x)⟩."""
    out = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    rows = [torch.autograd.grad((out * pr).sum(), params, retain_graph=True) for pr in projections]
    return [torch.stack([row[i] for row in rows]) for i in range(len(params))]


conv_settings = st.fixed_dictionaries(
    {
        "tasks": st.integers(1, 4),
        "batch": st.integers(1, 3),
        "in_groups": st.integers(1, 2),
        "groups": st.sampled_from([1, 2]),
        "kernel": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "padding": st.sampled_from([0, 1, 2, "valid"]),
        "dilation": st.integers(1, 2),
        "bias": st.booleans(),
        "size": st.integers(5, 8),
        "way": st.sampled_from(["measure", "gemm", "kernel"]),
    }
)


@settings(max_examples=40, deadline=None)
@given(conv_settings, st.integers(0, 2**16))
def test_conv_rule_matches_autograd(cfg: dict, seed: int) -> None:
    torch.manual_seed(seed)
    channels = 2 * cfg["in_groups"]
    conv = nn.Conv2d(
        channels,
        2 * cfg["groups"],
        cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        bias=cfg["bias"],
    ).double()
    x = torch.randn(cfg["batch"], channels, cfg["size"], cfg["size"], dtype=torch.float64)
    out_shape = conv(x).shape
    projections = torch.randn(cfg["tasks"], *out_shape, dtype=torch.float64)
    assert isinstance(rule_for(conv), Conv2dRule)
    rule = Conv2dRule(cfg["way"])
    want = per_task_autograd(conv, x, projections)
    got = rule.task_gradients(conv, x, projections)
    # every entry is a float32 sum over the layer's places (batch × output positions) of |B|·|A| products:
    # the same rule on absolute values gives the magnitude its round-off is relative to
    terms = rule.places(conv, projections)
    magnitude = rule.task_gradients(conv, x.abs(), projections.abs())
    for g, w, m in zip(got, want, magnitude, strict=True):
        assert_within_roundoff(g, w, m, terms, RULE_DTYPE)
    weights = torch.randn(cfg["tasks"], dtype=torch.float64)
    combined = torch.tensordot(weights, projections, dims=1)
    magnitude = rule.weighted_gradients(conv, x.abs(), torch.tensordot(weights.abs(), projections.abs(), dims=1))
    for g, w, m in zip(rule.weighted_gradients(conv, x, combined), want, magnitude, strict=True):
        assert_within_roundoff(g, torch.tensordot(weights, w, dims=1), m, terms, RULE_DTYPE)
    if cfg["groups"] == 1:
        flat = torch.cat([w.reshape(cfg["tasks"], -1) for w in want], dim=1)
        gram = rule.gramian_by_activations(conv, x, projections, torch.float64)
        magnitude = rule.gramian_by_activations(conv, x.abs(), projections.abs(), torch.float64)
        assert_within_roundoff(gram, flat @ flat.T, magnitude, terms, RULE_DTYPE)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(1, 3), min_size=1, max_size=3), st.booleans(), st.integers(0, 2**16))
@example(3, [3, 3, 3], False, 0)  # issue 15: off by 1.3e-6 against the fixed atol=1e-6 the test had before
def test_linear_rule_matches_autograd_on_any_leading_shape(tasks: int, leading: list[int], bias: bool, seed: int):
    torch.manual_seed(seed)
    linear = nn.Linear(5, 3, bias=bias).double()
    x = torch.randn(*leading, 5, dtype=torch.float64)
    projections = torch.randn(tasks, *leading, 3, dtype=torch.float64)
    rule = rule_for(linear)
    assert isinstance(rule, LinearRule)
    want = per_task_autograd(linear, x, projections)
    terms = rule.places(linear, projections)  # float32 sums over the leading positions (see the conv test)
    magnitude = rule.task_gradients(linear, x.abs(), projections.abs())
    for g, w, m in zip(rule.task_gradients(linear, x, projections), want, magnitude, strict=True):
        assert_within_roundoff(g, w, m, terms, RULE_DTYPE)
    flat = torch.cat([w.reshape(tasks, -1) for w in want], dim=1)
    gram = rule.gramian_by_activations(linear, x, projections, torch.float64)
    magnitude = rule.gramian_by_activations(linear, x.abs(), projections.abs(), torch.float64)
    assert_within_roundoff(gram, flat @ flat.T, magnitude, terms, RULE_DTYPE)
    assert rule.places(linear, projections) == x[..., 0].numel()


def test_convolutions_the_rules_cannot_express_are_not_tapped() -> None:
    assert rule_for(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")) is None
    assert rule_for(nn.Conv2d(2, 2, 3, padding="same")) is None
    assert rule_for(nn.Conv1d(2, 2, 3)) is None
    assert rule_for(nn.Conv2d(2, 2, 3, padding="valid")) is not None


def test_gramian_costs_favour_activations_where_places_are_few() -> None:
    """resnet18's layer4 conv at 64×64 input, batch 16, 40 tasks: 64 places, so the activation way wins; its
    layer1 conv (4096 places) keeps the weight gradients."""
    deep, shallow = nn.Conv2d(512, 512, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    rule = Conv2dRule()
    deep_grads, shallow_grads = torch.empty(40, 16, 512, 2, 2), torch.empty(40, 16, 64, 16, 16)
    assert rule.places(deep, deep_grads) == 64 and rule.places(shallow, shallow_grads) == 4096
    direct, by_activations = rule.gramian_costs(deep, deep_grads)
    assert by_activations * 10 < direct and rule.prefers_activations(deep, deep_grads)
    direct, by_activations = rule.gramian_costs(shallow, shallow_grads)
    assert by_activations > direct and not rule.prefers_activations(shallow, shallow_grads)
    grouped = nn.Conv2d(512, 512, 3, padding=1, groups=2)
    assert not rule.prefers_activations(grouped, deep_grads)


# ------------------------------------------------------------------------------------------------ the engine
class Shared(nn.Module):
    """A trunk whose conv runs twice (on the image and on its own output), a linear layer whose weight is tied
    to another's, a layer that feeds no loss, then two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 6)
        self.tied = nn.Linear(6, 6)
        self.tied_twin = nn.Linear(6, 6)
        self.tied_twin.weight = self.tied.weight
        self.unused = nn.Linear(6, 2)
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 2), nn.Linear(6, 1)])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("heads")]

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        x = self.norm(self.down(x)).mean(dim=(2, 3))
        rep = self.tied_twin(torch.tanh(self.tied(torch.tanh(self.fc(x)))))
        self.unused(rep)  # recorded, but no loss depends on it
        return rep

    def losses(self, rep: Tensor) -> Tensor:
        return torch.stack([(head(rep) ** 2).mean() * (t + 1) for t, head in enumerate(self.heads)])


def engine_step(
    path: str, needs: Needs, ask: str, weights: Tensor, use_rep: bool, balancer: balancers.Balancer | None = None
) -> tuple[Probe, list[Tensor]]:
    torch.manual_seed(0)
    net = Shared().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    taps = LayerTaps(net, net.shared_parameters()) if path == "layers" else None
    if taps is not None:
        assert set(taps.modules.values()) == {"conv", "down", "fc", "unused"}  # the tied pair is left to autograd
        with taps.recording():
            rep = net(x)
    else:
        rep = net(x)
    probe = Probe(needs, weights, ask=ask)
    engine = GradientEngine(
        net.shared_parameters(),
        list(net.heads.parameters()),
        rep if use_rep else None,
        mode="params",
        jacobian=path,
        taps=taps,
    )
    engine.backward(net.losses(rep), balancer if balancer is not None else probe)
    return probe, [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


#: the layer path sums float32 products over at most this many places per entry (the conv runs twice on a
#: batch of 4 images of 8×8), so its round-off is at most that many units of float32 relative to the largest
#: entry (a bound on the magnitude of the summands, as there is no cancellation-free way to get theirs).
LAYER_PATH_TERMS = 2 * 4 * 8 * 8


@pytest.mark.parametrize("use_rep", [True, False])
@pytest.mark.parametrize(("needs", "ask"), [(Needs.GRAMIAN, "gramian"), (Needs.JACOBIAN, "jacobian")])
def test_layer_path_equals_the_parameter_path(needs: Needs, ask: str, use_rep: bool) -> None:
    weights = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    want_probe, want = engine_step("batched", needs, ask, weights, use_rep)
    got_probe, got = engine_step("layers", needs, ask, weights, use_rep)
    seen = want_probe.seen[ask].double()
    # both sides round: the layer path's rules in float32, and each path's float32 Gramian (|K_st| ≤ max K)
    assert_within_roundoff(got_probe.seen[ask], seen, seen.abs().max(), 2 * LAYER_PATH_TERMS, RULE_DTYPE)
    for g, w in zip(got, want, strict=True):
        assert_within_roundoff(g, w, w.abs().max(), LAYER_PATH_TERMS, RULE_DTYPE)


@pytest.mark.parametrize("name", ["graddrop", "moco", "db_mtl", "excess_mtl", "imtl", "nash_mtl", "gradvac"])
def test_methods_that_read_the_jacobian_block_by_block_agree_on_both_paths(name: str) -> None:
    """Blocks formed layer by layer when reached (released or kept for the weighted update), IMTL's shared
    weights, two steps of state: the same update as from the vmapped parameter backward."""
    grads = {}
    for path in ("batched", "layers"):
        balancer = balancers.get(name)
        balancer.setup(3)
        for _ in range(2):
            _, grads[path] = engine_step(path, Needs.LOSSES, "", torch.ones(3), True, balancer.double())
    for g, w in zip(grads["layers"], grads["batched"], strict=True):
        assert_within_roundoff(g, w, w.abs().max(), LAYER_PATH_TERMS, RULE_DTYPE)


def test_an_input_changed_in_place_after_the_layer_read_it_is_refused() -> None:
    conv, head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 2)
    taps = LayerTaps(conv, conv.parameters())
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    with taps.recording():
        y = x * 1.0
        out = conv(y).mean(dim=(2, 3))
        y.add_(1.0)  # autograd does not need y again, but the layer's weight gradient does
    losses = torch.stack([head(out)[:, 0].mean(), head(out)[:, 1].mean()])
    engine = GradientEngine(list(conv.parameters()), list(head.parameters()), jacobian="layers", taps=taps)
    with pytest.raises(ConfigError, match="modified in place"):
        engine.backward(losses, balancers.get("mgda"))


def test_taps_record_only_inside_recording_with_gradients_and_forget_what_they_hand_over() -> None:
    model = tiny_model()
    taps = LayerTaps(model, model.shared_parameters())
    assert len(taps) > 0
    images = torch.rand(2, 3, 32, 32)
    model(images)
    assert taps.take() == []
    with taps.recording(), torch.no_grad():
        model(images)
    assert taps.take() == []
    with taps.recording():
        model(images)
    calls = taps.take()
    assert {call.name for call in calls} <= set(taps.modules.values()) and calls
    assert taps.take() == []
    taps.remove()
    with taps.recording():
        model(images)
    assert taps.take() == []


def test_the_layer_path_needs_taps_and_a_recorded_forward() -> None:
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ConfigError, match="needs the LayerTaps"):
        GradientEngine(list(conv.parameters()), [], jacobian="layers")
    taps = LayerTaps(conv, conv.parameters())
    out = conv(torch.randn(1, 2, 4, 4))  # not recorded
    engine = GradientEngine(list(conv.parameters()), [], jacobian="layers", taps=taps)
    with pytest.raises(ConfigError, match="no layer call recorded"):
        engine.backward(torch.stack([out.mean(), out.std()]), balancers.get("upgrad"))


def test_the_rule_takes_the_layer_path_for_gradient_methods_in_parameter_mode_only() -> None:
    assert resolve_jacobian_path("rule", balancers.get("upgrad"), "params", True) == "layers"
    assert resolve_jacobian_path("rule", balancers.get("upgrad"), "params", False) == "batched"
    assert resolve_jacobian_path("rule", balancers.get("mgda"), "representation", True) == "batched"
    assert resolve_jacobian_path("rule", balancers.get("moco"), "params", True) == "layers"  # G block by block
    assert resolve_jacobian_path("rule", balancers.get("uw"), "params", True) == "batched"  # losses only
    # auto measures where there is a choice to make (a gradient method in parameter mode), else the rule
    assert resolve_jacobian_path("auto", balancers.get("upgrad"), "params", False) == "auto"
    assert resolve_jacobian_path("auto", balancers.get("mgda"), "representation", True) == "batched"
    assert resolve_jacobian_path("auto", balancers.get("uw"), "params", True) == "batched"
    assert resolve_jacobian_path("loop", balancers.get("upgrad"), "params", True) == "loop"
    with pytest.raises(ConfigError, match="balancer.jacobian must be"):
        resolve_jacobian_path("vmap", balancers.get("upgrad"), "params", True)


def test_what_the_layer_path_hands_a_balancer_carries_no_graph() -> None:
    """Blocks, Gramian and update are data: a balancer that folds blocks into its state (ExcessMTL) must not
    chain one step's graph onto the next."""
    seen: dict[str, Tensor] = {}

    class Keep(Probe):
        def balance(self, losses: Tensor, grads: balancers.TaskGradients | None) -> balancers.Update:
            assert grads is not None
            seen["gramian"] = grads.gramian()
            seen["blocks"] = torch.cat([block for _, block in grads.jacobian_blocks()], dim=1)
            return balancers.Update(weights=self.w)

    keep = Keep(Needs.JACOBIAN, torch.ones(3))
    engine_step("layers", Needs.JACOBIAN, "", torch.ones(3, dtype=torch.float64), True, keep)
    assert seen and not any(t.requires_grad for t in seen.values())
