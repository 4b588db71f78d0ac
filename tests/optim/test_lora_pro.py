"""LoRA-Pro against dense references: least squares over the feasible set (lstsq on the Kronecker
form), the Sylvester equation solved as a linear system, the full gradient from a dense copy of the
weight, and torch's AdamW for the parameters without factors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import Tensor, nn

import rankwise as rw
from rankwise.optim import LoRAPro, LoRAProSGD, adjusted_gradients, equivalent_gradient

from _models import tiny_gpt2
from _trainer import cpu_trainer, token_rows

F64 = torch.float64
# Against undamped references: our inverses are pinv(M + 1e-8 I), the official damping.
DAMPED = {"rtol": 1e-6, "atol": 1e-7}


def _factors(m: int = 7, n: int = 6, r: int = 3, rank_B: int | None = None, seed: int = 0):
    """Random A (r, n), B (m, r) of rank ``rank_B``, a full gradient g (m, n) and s, in float64."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=gen, dtype=F64)
    rank_B = r if rank_B is None else rank_B
    B = torch.randn(m, rank_B, generator=gen, dtype=F64) @ torch.randn(rank_B, r, generator=gen, dtype=F64)
    g = torch.randn(m, n, generator=gen, dtype=F64)
    return A, B, g, 1.7


def _raw(A: Tensor, B: Tensor, g: Tensor, s: float) -> tuple[Tensor, Tensor]:
    return s * B.T @ g, s * g @ A.T  # G_A, G_B: LoRA's gradients for a full gradient g


def _least_squares_fit(A: Tensor, B: Tensor, g: Tensor, s: float) -> Tensor:
    """argmin over {s B a + s b A} of ||· − g||_F, by lstsq on the row-major Kronecker form."""
    m = B.shape[0]
    n = A.shape[1]
    features = s * torch.cat(
        [torch.kron(B, torch.eye(n, dtype=F64)), torch.kron(torch.eye(m, dtype=F64), A.T.contiguous())], dim=1
    )
    solution = torch.linalg.lstsq(features, g.reshape(-1, 1), driver="gelsd").solution
    return (features @ solution).reshape(m, n)


def _closed_form(A: Tensor, B: Tensor, s: float, G_A: Tensor, G_B: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's formulas with explicit pseudo-inverses and X from the Sylvester equation written
    as one linear system, (I ⊗ BᵀB + (AAᵀ) ⊗ I) vec(X) = vec(C), column-major."""
    r = A.shape[0]
    BtB_inv, AAt_inv = torch.linalg.pinv(B.T @ B), torch.linalg.inv(A @ A.T)
    g_A = BtB_inv @ G_A / s**2
    g_B = (torch.eye(B.shape[0], dtype=F64) - B @ BtB_inv @ B.T) @ G_B @ AAt_inv / s**2
    eye = torch.eye(r, dtype=F64)
    system = torch.kron(eye, B.T @ B) + torch.kron(A @ A.T, eye)
    rhs = -(BtB_inv @ G_A @ A.T) / s**2
    X = torch.linalg.solve(system, rhs.T.reshape(-1)).reshape(r, r).T
    return g_A + X @ A, g_B - B @ X


@pytest.mark.parametrize("rank_B", [3, 1, 0], ids=["full-rank B", "rank-1 B", "B = 0"])
def test_equivalent_gradient_is_the_least_squares_fit(rank_B: int) -> None:
    A, B, g, s = _factors(rank_B=rank_B)
    G_A, G_B = _raw(A, B, g, s)
    fit = _least_squares_fit(A, B, g, s)
    torch.testing.assert_close(equivalent_gradient(A, B, s, G_A, G_B), fit, **DAMPED)
    # The Sylvester-adjusted pair reaches the same optimum.
    g_A, g_B = adjusted_gradients(A, B, s, G_A, G_B)
    torch.testing.assert_close(s * (B @ g_A + g_B @ A), fit, **DAMPED)


def test_equivalent_gradient_is_the_tangent_space_projection() -> None:
    A, B, g, s = _factors()
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    projection = P_B @ g + (torch.eye(7, dtype=F64) - P_B) @ g @ P_A
    torch.testing.assert_close(equivalent_gradient(A, B, s, *_raw(A, B, g, s)), projection, **DAMPED)


def test_adjusted_gradients_equal_the_closed_form() -> None:
    A, B, g, s = _factors()
    G_A, G_B = _raw(A, B, g, s)
    for ours, reference in zip(adjusted_gradients(A, B, s, G_A, G_B), _closed_form(A, B, s, G_A, G_B), strict=True):
        torch.testing.assert_close(ours, reference, **DAMPED)


def test_every_X_gives_the_same_equivalent_gradient() -> None:
    A, B, g, s = _factors()
    G_A, G_B = _raw(A, B, g, s)
    reference = equivalent_gradient(A, B, s, G_A, G_B)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        X = 10 * torch.randn(3, 3, generator=gen, dtype=F64)
        g_A, g_B = adjusted_gradients(A, B, s, G_A, G_B, X=X)
        torch.testing.assert_close(s * (B @ g_A + g_B @ A), reference, rtol=1e-10, atol=1e-12)
        # and X enters as the paper writes it: g_A = g_A(0) + X A, g_B = g_B(0) − B X
        g_A0, g_B0 = adjusted_gradients(A, B, s, G_A, G_B, X=torch.zeros(3, 3, dtype=F64))
        torch.testing.assert_close(g_A, g_A0 + X @ A)
        torch.testing.assert_close(g_B, g_B0 - B @ X)


def test_sylvester_X_solves_its_equation_and_keeps_the_gradients_closest() -> None:
    A, B, g, s = _factors()
    G_A, G_B = _raw(A, B, g, s)
    g_A0, g_B0 = adjusted_gradients(A, B, s, G_A, G_B, X=torch.zeros(3, 3, dtype=F64))
    g_A, _ = adjusted_gradients(A, B, s, G_A, G_B)
    X = (g_A - g_A0) @ A.T @ torch.linalg.inv(A @ A.T)  # g_A = g_A(0) + X A

    rhs = -torch.linalg.inv(B.T @ B) @ G_A @ A.T / s**2
    torch.testing.assert_close((B.T @ B) @ X + X @ (A @ A.T), rhs, **DAMPED)
    # X minimizes ||g_A(0) + X A − G_A||² + ||g_B(0) − B X − G_B||²: lstsq over vec(X), row-major.
    eye = torch.eye(3, dtype=F64)
    design = torch.cat([torch.kron(eye, A.T.contiguous()), -torch.kron(B, eye)])
    target = torch.cat([(G_A - g_A0).reshape(-1), (G_B - g_B0).reshape(-1)])
    best = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.reshape(3, 3)
    torch.testing.assert_close(X, best, **DAMPED)


def test_first_step_from_B_zero_moves_only_B_along_the_row_space_of_A() -> None:
    A, _, g, s = _factors()
    B = torch.zeros(7, 3, dtype=F64)
    g_A, g_B = adjusted_gradients(A, B, s, *_raw(A, B, g, s))
    assert torch.equal(g_A, torch.zeros_like(g_A))
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    torch.testing.assert_close(s * g_B @ A, g @ P_A, **DAMPED)


def _single_layer(config: rw.LoRAConfig, seed: int = 0) -> tuple[nn.Module, rw.Adapted]:
    torch.manual_seed(seed)
    model = rw.adapt(nn.Sequential(nn.Linear(6, 5).double()), config)
    layer = model[0]
    with torch.no_grad():
        layer.delta.B.normal_(std=0.5)  # B ≠ 0, so both factors and the Sylvester X are exercised
    return model, layer


def _dense_gradient(layer: rw.Adapted, x: Tensor, y: Tensor, s: float) -> Tensor:
    """∂L/∂W for LoRA (W = W0 + s B A) or ∂L/∂V for DoRA's direction (V = W0 + s B A), from a dense copy."""
    w0, A, B = layer.base.weight, layer.delta.A.detach(), layer.delta.B.detach()
    V = (w0 + s * B @ A).requires_grad_()
    weight = V
    if isinstance(layer.delta, rw.DoRA):
        weight = (layer.delta.magnitude.detach() / V.norm(dim=1).detach()).unsqueeze(1) * V
    loss = (x @ weight.T + layer.base.bias - y).square().mean()
    return torch.autograd.grad(loss, V)[0]


@pytest.mark.parametrize(
    ("config", "scale"),
    [
        (rw.LoRAConfig(rank=2, alpha=3.0, targets="0"), 3.0 / 2),
        (rw.LoRAConfig(rank=2, alpha=3.0, rslora=True, targets="0"), 3.0 / math.sqrt(2)),
        (rw.DoRAConfig(rank=2, alpha=3.0, targets="0"), 3.0 / 2),
    ],
    ids=["lora", "rslora", "dora"],
)
def test_sgd_step_follows_the_closed_form_of_the_dense_gradient(config: rw.LoRAConfig, scale: float) -> None:
    model, layer = _single_layer(config)
    x, y = torch.randn(16, 6, dtype=F64), torch.randn(16, 5, dtype=F64)
    A, B = layer.delta.A.detach().clone(), layer.delta.B.detach().clone()
    g = _dense_gradient(layer, x, y, scale)
    g_A, g_B = _closed_form(A, B, scale, *_raw(A, B, g, scale))

    optimizer = LoRAProSGD(model, lr=0.1)
    (model(x) - y).square().mean().backward()
    magnitude = [(p.detach().clone(), p.grad.clone()) for p in layer.delta.parameters() if p.ndim == 1]
    optimizer.step()

    torch.testing.assert_close(layer.delta.A, A - 0.1 * g_A, **DAMPED)
    torch.testing.assert_close(layer.delta.B, B - 0.1 * g_B, **DAMPED)
    for before, grad in magnitude:  # DoRA's magnitude: plain SGD
        torch.testing.assert_close(layer.delta.magnitude, before - 0.1 * grad)


def test_adamw_steps_match_a_dense_reference() -> None:
    model, layer = _single_layer(rw.LoRAConfig(rank=2, alpha=3.0, targets="0"))
    s, lr, wd, (beta1, beta2), eps = 1.5, 0.01, 0.1, (0.9, 0.999), 1e-8
    optimizer = LoRAPro(model, lr=lr, weight_decay=wd)
    A, B = layer.delta.A.detach().clone(), layer.delta.B.detach().clone()
    M, V = torch.zeros(5, 6, dtype=F64), torch.zeros(5, 6, dtype=F64)
    for t in range(1, 4):
        x, y = torch.randn(16, 6, dtype=F64), torch.randn(16, 5, dtype=F64)
        g = _dense_gradient(layer, x, y, s)
        P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
        P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
        tangent = P_B @ g + (torch.eye(5, dtype=F64) - P_B) @ g @ P_A
        M, V = beta1 * M + (1 - beta1) * tangent, beta2 * V + (1 - beta2) * tangent**2
        adam = (M / (1 - beta1**t)) / ((V / (1 - beta2**t)).sqrt() + eps)
        g_A, g_B = _closed_form(A, B, s, *_raw(A, B, adam, s))
        A, B = A * (1 - lr * wd) - lr * g_A, B * (1 - lr * wd) - lr * g_B

        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        optimizer.step()
        torch.testing.assert_close(layer.delta.A, A, **DAMPED)
        torch.testing.assert_close(layer.delta.B, B, **DAMPED)


def _mlp_with_head(config_class: type[rw.LoRAConfig]) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    return rw.adapt(base, config_class(rank=2, targets="0", trainable=("2",)))


@pytest.mark.parametrize("config_class", [rw.LoRAConfig, rw.DoRAConfig])
def test_parameters_without_factors_get_torch_adamw(config_class: type[rw.LoRAConfig]) -> None:
    model = _mlp_with_head(config_class)
    twin = copy.deepcopy(model)
    optimizer = LoRAPro(model, lr=0.05, weight_decay=0.1)
    for group in optimizer.param_groups:
        if group["scale"] is not None:
            group["lr"] = 0.0  # factors frozen in place, so both models see the same head gradients
    factors = [id(p) for p in twin[0].delta.factors()[:2]]
    others = [p for p in twin.parameters() if p.requires_grad and id(p) not in factors]
    reference = torch.optim.AdamW(
        [
            {"params": [p for p in others if p.ndim >= 2]},
            {"params": [p for p in others if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=0.05,
        weight_decay=0.1,
    )
    for _ in range(3):
        x = torch.randn(10, 8, dtype=F64)
        for m, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, msg=name)
    assert not torch.equal(model[2].weight, _mlp_with_head(config_class)[2].weight)


def test_full_size_moments_are_the_only_state() -> None:
    model = rw.adapt(nn.Sequential(nn.Linear(768, 768)), rw.LoRAConfig(rank=8, targets="0"))
    for optimizer, expected in ((LoRAPro(model, lr=1e-4), 2 * 768 * 768 * 4), (LoRAProSGD(model, lr=1e-4), 0)):
        optimizer.zero_grad()
        model(torch.randn(4, 768)).square().mean().backward()
        optimizer.step()
        state_bytes = sum(
            t.nbytes for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor)
        )
        assert state_bytes == expected


def _regression(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """y = x (W0 + Δ)ᵀ with a rank-4 Δ: full fine-tuning reaches zero loss."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(24, 32, generator=gen) / math.sqrt(32)
    delta = torch.randn(24, 4, generator=gen) @ torch.randn(4, 32, generator=gen) / math.sqrt(128)
    x = torch.randn(256, 32, generator=gen)
    return w0, x, x @ (w0 + delta).T


def _regression_model(w0: Tensor) -> nn.Module:
    torch.manual_seed(1)
    base = nn.Linear(32, 24, bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    return rw.adapt(nn.Sequential(base), rw.LoRAConfig(rank=4, alpha=8, targets="0"))


def test_equivalent_gradient_is_closer_to_the_full_gradient_than_loras() -> None:
    w0, x, y = _regression()
    model = _regression_model(w0)
    A, B, s = model[0].delta.factors()
    optimizer = LoRAPro(model, lr=3e-3)
    cosines = {}
    for step in range(51):
        W = (w0 + s * B @ A).detach().requires_grad_()
        g = torch.autograd.grad((x @ W.T - y).square().mean(), W)[0]
        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        if step in (0, 50):
            pro = equivalent_gradient(A, B, s, A.grad, B.grad)
            lora = s * (B @ A.grad + B.grad @ A)  # W's direction under a plain LoRA gradient step
            cosines[step] = [torch.cosine_similarity(d.flatten(), g.flatten(), dim=0).item() for d in (pro, lora)]
            # an orthogonal projection: cos(P g, g) = ||P g|| / ||g||
            assert cosines[step][0] == pytest.approx((pro.norm() / g.norm()).item(), rel=1e-4)
        optimizer.step()
    # measured: step 0 (B = 0) 0.257 vs 0.238; step 50: 0.995 vs 0.902
    assert cosines[0][0] > cosines[0][1]
    assert cosines[50][0] > cosines[50][1] + 0.05


def test_loss_after_100_steps_is_lower_than_lora_with_adamw() -> None:
    w0, x, y = _regression()
    losses = {}
    for name in ("lora_pro", "lora"):
        model = _regression_model(w0)
        if name == "lora_pro":
            optimizer = LoRAPro(model, lr=3e-3)
        else:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / 100)
        for _ in range(100):
            optimizer.zero_grad()
            (model(x) - y).square().mean().backward()
            optimizer.step()
            schedule.step()
        losses[name] = (model(x) - y).square().mean().item()
    # measured from 1.098: LoRA-Pro 0.313, LoRA + AdamW 0.428 (ratio 0.73); asserted: 20 % lower
    assert losses["lora_pro"] < 0.8 * losses["lora"]


def _gpt2() -> nn.Module:
    base = tiny_gpt2(dropout=0.0)  # deterministic steps for the round trip
    return rw.adapt(base, rw.LoRAConfig(rank=2, targets=("c_attn", "c_proj")))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Tensor]) -> None:
    for ids in batches:
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def test_gpt2_conv1d_steps_and_state_dict_round_trip() -> None:
    model = _gpt2()
    optimizer = LoRAPro(model, lr=1e-3)
    assert (
        len([g for g in optimizer.param_groups if g["scale"] is not None]) == 6
    )  # 2 blocks × (c_attn, attn.c_proj, mlp.c_proj)
    batches = [torch.randint(0, 50, (4, 8)) for _ in range(4)]
    before = {k: v.clone() for k, v in rw.adapter_state_dict(model).items()}
    _train(model, optimizer, batches[:2])
    assert all(not torch.equal(before[k], v) for k, v in rw.adapter_state_dict(model).items() if k.endswith(".B"))

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    twin = copy.deepcopy(model)
    twin_optimizer = LoRAPro(twin, lr=1e-3)
    buffer.seek(0)
    twin_optimizer.load_state_dict(torch.load(buffer, weights_only=True))

    _train(model, optimizer, batches[2:])
    _train(twin, twin_optimizer, batches[2:])
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(ours, theirs), name


def test_trains_under_the_transformers_trainer(tmp_path) -> None:
    model = _gpt2()
    before = {k: v.clone() for k, v in rw.adapter_state_dict(model).items()}
    trainer = cpu_trainer(model, tmp_path, token_rows(12), lr=1e-3, optimizers=(LoRAPro(model, lr=1e-3), None))
    trainer.train()
    assert trainer.state.global_step == 3
    assert all(not torch.equal(before[k], v) for k, v in rw.adapter_state_dict(model).items())


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no rankwise adapters"):
        LoRAPro(nn.Sequential(nn.Linear(4, 4)))
    bone = rw.adapt(nn.Sequential(nn.Linear(4, 4)), rw.BoneConfig(rank=2, targets="0"))
    with pytest.raises(ValueError, match=r"factors\(\).*\['bone'\]"):
        LoRAPro(bone)
    model = rw.adapt(nn.Sequential(nn.Linear(4, 4)), rw.LoRAConfig(rank=2, targets="0"))
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0"):
        LoRAPro(model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr=-1"):
        LoRAProSGD(model, lr=-1)
    model[0].delta.A.requires_grad_(False)
    with pytest.raises(ValueError, match="'0' has only one of its factors"):
        LoRAPro(model)
