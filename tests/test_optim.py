"""metaopt_core.optim: MirrorDescent and its Bregman divergences against exact dense computations."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from metaopt_core.models import build_model
from metaopt_core.optim import (
    DenseBregman,
    DiagonalBregman,
    Divergence,
    DivergenceFormatError,
    KroneckerBregman,
    MirrorDescent,
    ShapeMismatchError,
    attach,
    load_divergence,
    save_divergence,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class SmallNet(nn.Module):
    """Conv (tied bias), BatchNorm (untied 1-D), Linear (tied bias), Linear without bias."""

    def __init__(self, conv_out: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, conv_out, kernel_size=3)
        self.norm = nn.BatchNorm2d(conv_out)
        self.fc = nn.Linear(conv_out * 2 * 2, hidden)
        self.head = nn.Linear(hidden, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x))).flatten(1)
        return self.head(torch.relu(self.fc(h)))


def _randomise(div: Divergence, seed: int = 0, scale: float = 0.7) -> Divergence:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in div.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return div


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _random_like(params, seed: int, dtype=None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=dtype or p.dtype) for p in params]


# ----------------------------------------------------------------------------- Kronecker: layout & vec


def test_kronecker_layout_ties_layer_biases_and_keeps_norm_params_as_column_blocks():
    div = KroneckerBregman.for_model(SmallNet())
    layout = [(b.parameter, b.rows, b.cols, b.bias) for b in div.blocks]
    assert layout == [
        ("conv.weight", 3, 2 * 3 * 3, "conv.bias"),  # conv weight (out, in*kh*kw)
        ("norm.weight", 3, 1, None),
        ("norm.bias", 3, 1, None),
        ("fc.weight", 5, 12, "fc.bias"),
        ("head.weight", 2, 5, None),
    ]
    # no model needed: the same layout from explicit shapes
    shapes = [(n, p.shape) for n, p in SmallNet().named_parameters()]
    assert KroneckerBregman.for_shapes(shapes).description() == div.description()
    # all factors start at zero, so M = I
    assert torch.equal(div.to_dense(), torch.eye(sum(p.numel() for p in SmallNet().parameters())))


def test_transposed_conv_bias_is_not_tied_to_the_input_side():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3))
    div = KroneckerBregman.for_model(model)
    assert [b.bias for b in div.blocks] == [None, None]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kronecker_step_matches_dense_solve_on_linear_and_conv(weight_decay):
    torch.manual_seed(0)
    model = SmallNet().double()
    div = _randomise(KroneckerBregman.for_model(model, dtype=torch.float64))
    before = [p.detach().clone() for p in model.parameters()]
    grads = _random_like(before, seed=1)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    lr = 0.3
    MirrorDescent(model.parameters(), div, lr=lr, weight_decay=weight_decay).step()

    names = [n for n, _ in model.named_parameters()]
    for name, p, p0, g in zip(names, model.parameters(), before, grads):
        blk = next(b for b in div.blocks if name in (b.parameter, b.bias))
        A, B = div.factor_matrices(div.blocks.index(blk))
        if name == blk.bias:
            M = B
        else:
            M = torch.kron(B, A)  # acts on the row-major flatten of the (rows, cols) matrix
            # the thesis's A (x) B acts on the column-major vec; on PyTorch's row-major flatten it is not M
            if blk.rows > 1 and blk.cols > 1:
                wrong = torch.linalg.solve(torch.kron(A, B), g.reshape(-1))
                assert not torch.allclose(wrong, torch.linalg.solve(M, g.reshape(-1)), atol=1e-3)
        effective = g.reshape(-1) + weight_decay * p0.reshape(-1)
        expected = p0.reshape(-1) - lr * torch.linalg.solve(M, effective)
        torch.testing.assert_close(p.detach().reshape(-1), expected, atol=1e-10, rtol=1e-10, msg=name)


def test_kronecker_step_on_an_mlp_whose_vector_blocks_are_all_tied_biases():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    div = _randomise(KroneckerBregman.for_model(model, dtype=torch.float64), seed=31)
    assert [b.bias for b in div.blocks] == ["0.bias", "2.bias"]
    before = [p.detach().clone() for p in model.parameters()]
    grads = _random_like(before, seed=32)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    MirrorDescent(model.parameters(), div, lr=0.2, weight_decay=0.05).step()
    expected = _flat(before) - 0.2 * torch.linalg.solve(div.to_dense(), _flat(grads) + 0.05 * _flat(before))
    torch.testing.assert_close(_flat(p.detach() for p in model.parameters()), expected, atol=1e-10, rtol=1e-10)


def test_kronecker_float32_step_matches_float64_dense_reference():
    torch.manual_seed(1)
    model = SmallNet()
    div = _randomise(KroneckerBregman.for_model(model), seed=3)
    grads = _random_like(list(model.parameters()), seed=4)
    before = [p.detach().double().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    MirrorDescent(model.parameters(), div, lr=0.1).step()
    M = div.to_dense().double()
    expected = _flat(before) - 0.1 * torch.linalg.solve(M, _flat(grads).double())
    torch.testing.assert_close(_flat(p.detach() for p in model.parameters()).double(), expected, atol=1e-5, rtol=1e-5)


def test_precondition_is_functional_and_equals_dense_inverse_and_optimizer_path():
    model = SmallNet().double()
    div = _randomise(KroneckerBregman.for_model(model, dtype=torch.float64), seed=5)
    vectors = _random_like(list(model.parameters()), seed=6)  # arbitrary tensors, not .grad
    out = div.precondition(vectors)
    expected = torch.linalg.solve(div.to_dense(), _flat(vectors))
    torch.testing.assert_close(_flat(out), expected, atol=1e-12, rtol=1e-10)
    assert [o.shape for o in out] == [v.shape for v in vectors]
    # metric_product is the inverse map
    torch.testing.assert_close(_flat(div.metric_product(out)), _flat(vectors), atol=1e-10, rtol=1e-10)


def test_channels_last_conv_weight_takes_the_strided_path():
    conv = nn.Conv2d(3, 4, 3).double()
    div = _randomise(KroneckerBregman.for_model(conv, dtype=torch.float64), seed=7)
    ref = [p.detach().clone() for p in conv.parameters()]
    conv = conv.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    grads = _random_like(ref, seed=8)
    for p, g in zip(conv.parameters(), grads):
        p.grad = g.clone()
    MirrorDescent(conv.parameters(), div, lr=0.5).step()
    expected = [r - 0.5 * s for r, s in zip(ref, div.precondition(grads))]
    for p, e in zip(conv.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


# ----------------------------------------------------------------------------- Kronecker: divergence terms


def test_kronecker_bregman_and_frobenius_against_dense():
    model = SmallNet().double()
    div = _randomise(KroneckerBregman.for_model(model, dtype=torch.float64), seed=9)
    theta = _random_like(list(model.parameters()), seed=10)
    theta_ref = _random_like(list(model.parameters()), seed=11)
    M = div.to_dense()
    delta = _flat(theta) - _flat(theta_ref)
    torch.testing.assert_close(div.bregman(theta, theta_ref), 0.5 * delta @ M @ delta, rtol=1e-12, atol=1e-12)
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    torch.testing.assert_close(div.frobenius_reg(), ((M - eye) ** 2).sum(), rtol=1e-12, atol=1e-10)
    # and the closed form of the brief for one block: ||A||^2 ||B||^2 - 2 tr(A) tr(B) + dim
    A, B = div.factor_matrices(3)
    brief = (A**2).sum() * (B**2).sum() - 2 * A.trace() * B.trace() + A.shape[0] * B.shape[0]
    torch.testing.assert_close(brief, ((torch.kron(B, A) - torch.eye(A.shape[0] * B.shape[0], dtype=A.dtype)) ** 2).sum())


def test_frobenius_stays_accurate_in_float32_for_small_factors_on_a_large_layer():
    div = KroneckerBregman.for_shapes([("w", (512, 4608))])
    with torch.no_grad():
        div.a[0].fill_(1e-3)
        div.b[0].fill_(1e-3)
    p, q = 4608 * 1e-6, 512 * 1e-6
    exact = 4608 * q**2 + 512 * p**2 + 2 * p * q + 2 * p * q**2 + 2 * p**2 * q + p**2 * q**2
    assert math.isclose(div.frobenius_reg().item(), exact, rel_tol=1e-5)


@pytest.mark.parametrize(
    "shapes",
    [
        [("fc.weight", (4, 3)), ("fc.bias", (4,)), ("norm.weight", (4,))],  # lambda = 1
        [("w", (1, 5))],  # rows 1: sigma_min(B) = 1 + b^2
        [("w", (3, 1))],  # cols 1: sigma_min(A) = 1 + a^2
        [("w", (1, 1)), ("s", ())],  # scalar blocks: (1 + a^2)(1 + b^2)
        [("w", (1, 1)), ("w2", (1, 1))],
    ],
)
def test_strong_convexity_equals_smallest_eigenvalue_including_dim_one_factors(shapes):
    div = _randomise(KroneckerBregman.for_shapes(shapes, dtype=torch.float64), seed=12, scale=1.3)
    expected = torch.linalg.eigvalsh(div.to_dense())[0]
    torch.testing.assert_close(div.strong_convexity(), expected, rtol=1e-10, atol=1e-10)
    if any(len(s) == 2 and min(s) > 1 for _, s in shapes) or any(len(s) == 1 for _, s in shapes):
        assert div.strong_convexity().item() == pytest.approx(1.0)
    else:
        assert div.strong_convexity().item() > 1.0


# ----------------------------------------------------------------------------- SGD equivalence & gradients


def test_zero_factors_reproduce_sgd_with_weight_decay_over_several_steps():
    torch.manual_seed(2)
    model_md = SmallNet()
    model_sgd = copy.deepcopy(model_md)
    opt_md = MirrorDescent(model_md.parameters(), KroneckerBregman.for_model(model_md), lr=0.05, weight_decay=0.01)
    opt_sgd = torch.optim.SGD(model_sgd.parameters(), lr=0.05, weight_decay=0.01)
    x, y = torch.randn(16, 2, 4, 4), torch.randint(0, 2, (16,))
    for _ in range(5):
        for model, opt in ((model_md, opt_md), (model_sgd, opt_sgd)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, p), q in zip(model_md.named_parameters(), model_sgd.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(model_md.fc.weight, SmallNet().fc.weight)


def test_step_is_differentiable_wrt_factors_gradcheck():
    div = _randomise(KroneckerBregman.for_shapes([("w", (3, 4)), ("b", (3,)), ("n", (2,))], tied_biases={"b": "w"}, dtype=torch.float64), seed=13)
    grads = _random_like([torch.empty(3, 4), torch.empty(3), torch.empty(2)], seed=14, dtype=torch.float64)
    names = [n for n, _ in div.named_parameters()]

    def step_of_factors(*factors):
        out = torch.func.functional_call(div, dict(zip(names, factors)), (grads,))
        return tuple(-0.1 * o for o in out)

    leaves = tuple(p.detach().clone().requires_grad_(True) for p in div.parameters())
    assert torch.autograd.gradcheck(step_of_factors, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)

    class Terms(nn.Module):  # functional_call swaps the factors of the wrapped divergence
        def __init__(self) -> None:
            super().__init__()
            self.div = div

        def forward(self):
            zeros = [torch.zeros_like(g) for g in grads]
            return self.div.bregman(grads, zeros), self.div.frobenius_reg(), self.div.strong_convexity()

    terms_module = Terms()

    def terms(*factors):
        return torch.func.functional_call(terms_module, {f"div.{n}": f for n, f in zip(names, factors)}, ())

    assert torch.autograd.gradcheck(terms, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_hypergradient_wrt_a_matches_finite_differences_of_the_step():
    # d(theta_1)/d(a) for theta_1 = theta_0 - lr M(a, b)^{-1} g, central differences in float64
    div = _randomise(KroneckerBregman.for_shapes([("w", (4, 3))], dtype=torch.float64), seed=15)
    g = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    probe = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    (step,) = div.precondition([g])
    (grad_a,) = torch.autograd.grad((-0.2 * step * probe).sum(), [div.a[0]])
    eps = 1e-6
    numeric = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for j in range(3):
            vals = []
            for sign in (1, -1):
                div.a[0][j] += sign * eps
                vals.append((-0.2 * div.precondition([g])[0] * probe).sum())
                div.a[0][j] -= sign * eps
            numeric[j] = (vals[0] - vals[1]) / (2 * eps)
    torch.testing.assert_close(grad_a, numeric, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- other families


@pytest.mark.parametrize("family", ["diagonal", "dense"])
def test_diagonal_and_dense_steps_and_terms_match_dense_computation(family):
    model = SmallNet().double()
    if family == "diagonal":
        div = _randomise(DiagonalBregman.for_model(model, dtype=torch.float64), seed=18, scale=0.5)
    else:
        div = _randomise(DenseBregman.for_model(model, dtype=torch.float64), seed=18, scale=0.2)
    before = [p.detach().clone() for p in model.parameters()]
    grads = _random_like(before, seed=19)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    MirrorDescent(model.parameters(), div, lr=0.2, weight_decay=0.1).step()
    M = div.to_dense()
    expected = _flat(before) - 0.2 * torch.linalg.solve(M, _flat(grads) + 0.1 * _flat(before))
    torch.testing.assert_close(_flat(p.detach() for p in model.parameters()), expected, atol=1e-9, rtol=1e-9)

    theta, theta_ref = _random_like(before, seed=20), _random_like(before, seed=21)
    delta = _flat(theta) - _flat(theta_ref)
    torch.testing.assert_close(div.bregman(theta, theta_ref), 0.5 * delta @ M @ delta)
    torch.testing.assert_close(div.frobenius_reg(), ((M - torch.eye(M.shape[0], dtype=M.dtype)) ** 2).sum())
    torch.testing.assert_close(div.strong_convexity(), torch.linalg.eigvalsh(M)[0])


def test_dense_on_raw_tensors_with_m_equal_hessian_solves_a_quadratic_in_one_step():
    # min 1/2 t^T Q t - b^T t: mirror descent with M = Q and lr 1 is Newton's method
    Q = torch.tensor([[3.0, 0.3], [0.3, 0.05]], dtype=torch.float64)
    bvec = torch.tensor([1.0, 1.2], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    div = DenseBregman.for_params([theta], epsilon=1e-3, dtype=torch.float64)
    with torch.no_grad():
        div.raw_factor.copy_(torch.linalg.cholesky(Q - 1e-3 * torch.eye(2, dtype=torch.float64)))
    torch.testing.assert_close(div.to_dense(), Q)
    opt = MirrorDescent([theta], div, lr=1.0)
    (0.5 * theta @ Q @ theta - bvec @ theta).backward()
    opt.step()
    torch.testing.assert_close(theta.detach(), torch.linalg.solve(Q, bvec))


def test_dense_refuses_a_network_sized_matrix():
    with pytest.raises(ValueError, match="max_dim"):
        DenseBregman.for_shapes([("w", (100, 100))])


# ----------------------------------------------------------------------------- optimiser API


def test_optimizer_argument_errors_name_the_argument():
    model = SmallNet()
    div = KroneckerBregman.for_model(model)
    with pytest.raises(ValueError, match="lr: got -0.1"):
        MirrorDescent(model.parameters(), div, lr=-0.1)
    with pytest.raises(ValueError, match="weight_decay: got -1"):
        MirrorDescent(model.parameters(), div, lr=0.1, weight_decay=-1)
    with pytest.raises(TypeError, match="divergence"):
        MirrorDescent(model.parameters(), torch.eye(2), lr=0.1)
    with pytest.raises(ShapeMismatchError, match=r"parameter #0 'conv.weight'.*\(3, 2, 3, 3\).*\(5, 2, 3, 3\)"):
        MirrorDescent(SmallNet(conv_out=5).parameters(), div, lr=0.1)
    with pytest.raises(ShapeMismatchError, match="the first is #1 'conv.bias'"):
        MirrorDescent([model.conv.weight], div, lr=0.1)


def test_param_groups_continue_the_divergence_order_with_their_own_lr():
    model = SmallNet().double()
    div = _randomise(KroneckerBregman.for_model(model, dtype=torch.float64), seed=22)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    grads = _random_like(params, seed=23)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    params[3].grad = None  # a parameter without gradient is left alone
    opt = MirrorDescent([{"params": params[:2], "lr": 0.5}, {"params": params[2:]}], div, lr=0.1)
    opt.step()
    steps = div.precondition(grads)
    for k, (p, p0, s) in enumerate(zip(params, before, steps)):
        lr = 0.5 if k < 2 else 0.1
        expected = p0 if k == 3 else p0 - lr * s
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_continues_identically(device):
    torch.manual_seed(3)
    model1 = SmallNet().to(device)
    div1 = _randomise(KroneckerBregman.for_model(model1), seed=24).to(device)
    opt1 = MirrorDescent(model1.parameters(), div1, lr=0.05, weight_decay=1e-3)
    x, y = torch.randn(8, 2, 4, 4, device=device), torch.randint(0, 2, (8,), device=device)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    train(model1, opt1, 2)
    state = opt1.state_dict()
    saved_a0 = state["divergence"]["tensors"]["a.0"].clone()
    model2 = copy.deepcopy(model1)
    div2 = KroneckerBregman.for_model(model2).to(device)  # fresh factors (M = I)
    opt2 = MirrorDescent(model2.parameters(), div2, lr=1.0)
    opt2.load_state_dict(copy.deepcopy(state))
    assert opt2.param_groups[0]["lr"] == 0.05 and opt2.param_groups[0]["weight_decay"] == 1e-3
    for p, q in zip(div1.parameters(), div2.parameters()):
        assert torch.equal(p, q)
    train(model1, opt1, 3)
    train(model2, opt2, 3)
    for p, q in zip(model1.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():  # the state dict holds a copy, not a view of the live factors
        div1.a[0].add_(1.0)
    assert torch.equal(state["divergence"]["tensors"]["a.0"], saved_a0)


def test_load_state_dict_rejects_another_divergence_kind_or_layout():
    model = SmallNet()
    state = MirrorDescent(model.parameters(), KroneckerBregman.for_model(model), lr=0.1).state_dict()
    diag_opt = MirrorDescent(model.parameters(), DiagonalBregman.for_model(model), lr=0.1)
    with pytest.raises(ValueError, match=r"\['kind'\]: got 'kronecker'"):
        diag_opt.load_state_dict(state)
    no_ties = MirrorDescent(model.parameters(), KroneckerBregman.for_model(model, tied_biases={}), lr=0.1)
    with pytest.raises(ValueError, match="description"):
        no_ties.load_state_dict(state)
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match=r"\['divergence'\]: missing"):
        diag_opt.load_state_dict(plain)


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", [KroneckerBregman, DiagonalBregman, DenseBregman])
def test_save_load_round_trip(tmp_path, family):
    model = SmallNet()
    div = _randomise(family.for_model(model), seed=25, scale=0.3)
    save_divergence(div, tmp_path / "div", lr=0.05, metadata={"run_id": "abc"})
    manifest = json.loads((tmp_path / "div" / "manifest.json").read_text())
    assert manifest["kind"] == family.kind and manifest["format_version"] == 1 and manifest["lr"] == 0.05
    assert manifest["parameters"][0] == {"name": "conv.weight", "shape": [3, 2, 3, 3]}
    loaded, loaded_manifest = load_divergence(tmp_path / "div")
    assert type(loaded) is family and loaded_manifest == manifest
    assert loaded.description() == div.description()
    for (k, v), (k2, v2) in zip(div.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_from_pretrained_uses_the_saved_lr_and_steps_like_the_original(tmp_path):
    torch.manual_seed(4)
    model = SmallNet()
    div = _randomise(KroneckerBregman.for_model(model), seed=26)
    save_divergence(div, tmp_path, lr=0.07)
    twin = copy.deepcopy(model)
    opt = MirrorDescent.from_pretrained(tmp_path, twin)
    assert opt.param_groups[0]["lr"] == 0.07
    assert MirrorDescent.from_pretrained(tmp_path, twin, lr=0.5).param_groups[0]["lr"] == 0.5
    reference = MirrorDescent(model.parameters(), div, lr=0.07)
    grads = _random_like(list(model.parameters()), seed=27)
    for m, o in ((model, reference), (twin, opt)):
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    save_divergence(div, tmp_path / "no_lr")
    with pytest.raises(ValueError, match="lr: not given"):
        MirrorDescent.from_pretrained(tmp_path / "no_lr", model)


def test_attach_names_the_first_mismatching_parameter(tmp_path):
    save_divergence(KroneckerBregman.for_model(SmallNet()), tmp_path, lr=0.1)
    div, _ = load_divergence(tmp_path)
    other = SmallNet(hidden=7)  # fc.weight, fc.bias and head.weight all differ; fc.weight is first
    with pytest.raises(ShapeMismatchError) as err:
        attach(div, other)
    message = str(err.value)
    assert "'fc.weight'" in message and "(5, 12)" in message and "(7, 12)" in message
    assert "head.weight" not in message.split(". The divergence fits")[0]  # the first mismatch only; then both architectures
    assert "The divergence fits a network of 7 parameter tensors" in message and "partial=True" in message
    with pytest.raises(ShapeMismatchError, match="'fc.weight'.*expects shape \\(5, 12\\), got shape \\(7, 12\\)"):
        MirrorDescent.from_pretrained(tmp_path, other)
    with pytest.raises(ShapeMismatchError, match="only 4 parameters"):
        attach(div, nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)))
    bigger = nn.Sequential(SmallNet(), nn.Linear(2, 2))
    with pytest.raises(ShapeMismatchError, match=r"#7 '1.weight'"):
        attach(div, bigger)
    assert attach(div, SmallNet()) is div


def _saved(tmp_path):
    directory = tmp_path / "saved"
    save_divergence(_randomise(KroneckerBregman.for_model(SmallNet()), seed=28), directory, lr=0.1)
    return directory


def test_tampered_tensor_file_is_rejected(tmp_path):
    directory = _saved(tmp_path)
    path = directory / "divergence.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last factor's values
    path.write_bytes(bytes(data))
    with pytest.raises(DivergenceFormatError, match="sha256.*modified or corrupted"):
        load_divergence(directory)
    path.write_bytes(b"not a safetensors file")
    manifest = json.loads((directory / "manifest.json").read_text())
    import hashlib

    manifest["tensor_sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DivergenceFormatError, match="not a readable safetensors file"):
        load_divergence(directory)


def test_tensor_with_wrong_shape_is_rejected_even_with_a_matching_digest(tmp_path):
    import hashlib

    from safetensors.torch import save_file

    directory = _saved(tmp_path)
    tensors = KroneckerBregman.for_model(SmallNet()).state_dict()
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["a.3"] = torch.zeros(13)
    save_file(tensors, str(directory / "divergence.safetensors"))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["tensor_sha256"] = hashlib.sha256((directory / "divergence.safetensors").read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DivergenceFormatError, match="'a.3'"):
        load_divergence(directory)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(kind="svd"), "'kind' is 'svd'"),
        (lambda m: m.update(format_version=99), "'format_version' is 99"),
        (lambda m: m.pop("parameters"), "'parameters' is missing"),
        (lambda m: m["parameters"][3].update(shape=[5, "x"]), r"parameters\[3\]"),
        (lambda m: m["parameters"][6].update(shape=[3, 5]), r"blocks\[4\]: got .*rows.: 2"),
        (lambda m: m.update(lr=-1), "'lr' is -1"),
        (lambda m: m["blocks"][0].update(bias="nope"), "nope"),
    ],
)
def test_malformed_manifest_is_rejected_naming_the_field(tmp_path, edit, match):
    directory = _saved(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DivergenceFormatError, match=match):
        load_divergence(directory)


def test_manifest_that_is_not_json_is_rejected(tmp_path):
    directory = _saved(tmp_path)
    (directory / "manifest.json").write_text("{ truncated")
    with pytest.raises(DivergenceFormatError, match="not valid JSON"):
        load_divergence(directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_divergence(directory)


def test_save_argument_errors():
    with pytest.raises(ValueError, match="lr: got 0"):
        save_divergence(KroneckerBregman.for_model(SmallNet()), "/tmp/unused-optim-test", lr=0)
    with pytest.raises(ValueError, match="names_and_shapes\\[1\\] name: 'w' appears twice"):
        KroneckerBregman.for_shapes([("w", (2, 2)), ("w", (2,))])
    with pytest.raises(ValueError, match="tied_biases\\['b'\\]"):
        KroneckerBregman.for_shapes([("w", (2, 2)), ("b", (3,))], tied_biases={"b": "w"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu_step():
    torch.manual_seed(5)
    model = SmallNet()
    div = _randomise(KroneckerBregman.for_model(model), seed=29)
    grads = _random_like(list(model.parameters()), seed=30)
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        d = copy.deepcopy(div).to(device)
        for p, g in zip(m.parameters(), grads):
            p.grad = g.to(device)
        MirrorDescent(m.parameters(), d, lr=0.1, weight_decay=1e-2).step()
        results.append(_flat(p.detach().cpu() for p in m.parameters()))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_compiled_step_equals_the_eager_step():
    """``compile=`` routes the update through torch.compile; the "eager" backend checks the wiring
    in a second (inductor's kernels are measured by ``bench/optim_step.py --compile``)."""
    torch.manual_seed(0)
    models = [build_model("mlp2", 1, 28, 10, seed=0) for _ in range(2)]
    div = KroneckerBregman.for_model(models[0])
    with torch.no_grad():
        for f in div.parameters():
            f.normal_(0, 0.1)
    optimisers = [MirrorDescent(models[0].parameters(), div, lr=0.1), MirrorDescent(models[1].parameters(), div, lr=0.1, compile="eager")]
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        for model, optimiser in zip(models, optimisers):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q)
