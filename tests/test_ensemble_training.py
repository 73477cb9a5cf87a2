"""StackedAdam: per-model learning rates, weight decays and early stopping over stacked
parameters, each model updated as torch.optim.Adam updates it alone (bit for bit on the CPU);
its state_dict; bad input; SplineODE networks trained together (stack_module_state +
functional_call + vmap) equal to the same networks trained one at a time."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

import splinet_cuda as sc
from helpers import skip_unless

SHAPE = (5, 7, 3)  # 105 elements a model: not a multiple of any vector width, so tails are exercised


def _gradients(M, steps, dtype, seed=0):
    """The initial stacked parameter and one stacked gradient per step."""
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn((M,) + SHAPE, dtype=dtype, generator=gen)
    return init, [torch.randn((M,) + SHAPE, dtype=dtype, generator=gen) for _ in range(steps)]


def _stacked(init, grads, masks=None, **kw):
    """The stacked parameter after StackedAdam's steps on the given gradients."""
    p = init.clone().requires_grad_()
    opt = sc.StackedAdam([p], **kw)
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.step(active=None if masks is None else masks[i])
    return p.detach()


def _alone(init, grads, model, masks=None, *, lr, weight_decay=0.0, **kw):
    """Model ``model`` trained alone by torch.optim.Adam, stepping where its mask entry is True."""
    p = init[model].clone().requires_grad_()
    opt = torch.optim.Adam([p], lr=lr, weight_decay=weight_decay, **kw)
    for i, g in enumerate(grads):
        if masks is not None and not masks[i][model]:
            continue
        p.grad = g[model].clone()
        opt.step()
    return p.detach()


def _assert_bitwise(a, b, msg=""):
    assert a.dtype == b.dtype and torch.equal(a, b), f"{msg}: max |diff| {(a - b).abs().max().item()}"


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("amsgrad_free_betas", [(0.9, 0.999), (0.5, 0.9)])
def test_same_settings_equal_adam(dtype, foreach, amsgrad_free_betas):
    """One lr for every model: each model's trajectory is torch.optim.Adam's alone, bit for bit
    (both of Adam's CPU algorithms, for-loop and foreach)."""
    init, grads = _gradients(3, 6, dtype)
    out = _stacked(init, grads, lr=0.05, betas=amsgrad_free_betas)
    for i in range(3):
        _assert_bitwise(out[i], _alone(init, grads, i, lr=0.05, betas=amsgrad_free_betas, foreach=foreach), f"model {i}")


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_per_model_lr_and_weight_decay(dtype, decoupled, as_tensor):
    """M learning rates and weight decays (a zero among them): model i equals Adam(lr[i],
    weight_decay[i]) alone, bit for bit; AdamW (decoupled) too."""
    lrs, wds = [1e-3, 3e-2, 0.1, 0.5], [0.0, 1e-2, 0.3, 1e-4]
    init, grads = _gradients(4, 7, dtype)
    lr = torch.tensor(lrs, dtype=torch.float64) if as_tensor else lrs
    wd = torch.tensor(wds, dtype=torch.float64) if as_tensor else wds
    out = _stacked(init, grads, lr=lr, weight_decay=wd, decoupled_weight_decay=decoupled)
    for i in range(4):
        alone = _alone(init, grads, i, lr=lrs[i], weight_decay=wds[i], decoupled_weight_decay=decoupled)
        _assert_bitwise(out[i], alone, f"model {i}")
    # a float32 lr tensor: each model's lr is its float32 value, as Adam(lr=float(lr[i])) takes it
    lr32 = torch.tensor(lrs, dtype=torch.float32)
    out = _stacked(init, grads, lr=lr32)
    for i in range(4):
        _assert_bitwise(out[i], _alone(init, grads, i, lr=float(lr32[i])), f"float32 lr, model {i}")


def test_active_mask_freezes_stopped_models(dtype):
    """Early stopping: a masked model's parameters and state do not move (its gradient, here
    NaN, is never read) and its step count pauses; the others, and a model that resumes, equal
    Adam alone over the steps they took."""
    lrs = [0.01, 0.1, 0.03]
    init, grads = _gradients(3, 8, dtype)
    masks = [[True, True, True], [True, False, True], [False, False, True], [True, True, False]] * 2
    for g, mask in zip(grads, masks):
        for i, on in enumerate(mask):
            if not on:
                g[i] = float("nan")
    out = _stacked(init, grads, masks, lr=torch.tensor(lrs), weight_decay=0.05)
    for i in range(3):
        alone = _alone(init, grads, i, masks, lr=float(torch.tensor(lrs)[i]), weight_decay=0.05)
        _assert_bitwise(out[i], alone, f"model {i}")
    # stopped for good after the first step: the parameter and the state stay as they were then
    p = init.clone().requires_grad_()
    opt = sc.StackedAdam([p], lr=0.1)
    p.grad = grads[0].nan_to_num()
    opt.step()
    frozen = (p.detach()[1].clone(), opt.state[p]["exp_avg"][1].clone(), opt.state[p]["exp_avg_sq"][1].clone())
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step(active=torch.tensor([True, False, True]))
    assert torch.equal(p.detach()[1], frozen[0])
    assert torch.equal(opt.state[p]["exp_avg"][1], frozen[1])
    assert torch.equal(opt.state[p]["exp_avg_sq"][1], frozen[2])
    assert opt.state[p]["step"].tolist() == [4.0, 1.0, 4.0]
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step(active=[False, False, False])  # nobody steps: nothing changes
    assert torch.equal(p.detach(), before) and opt.state[p]["step"].tolist() == [4.0, 1.0, 4.0]


def test_state_dict_round_trip(dtype):
    """Training stopped, saved, loaded into a fresh optimizer and resumed equals training on."""
    lr = torch.tensor([0.01, 0.2], dtype=torch.float64)
    init, grads = _gradients(2, 6, dtype)
    whole = _stacked(init, grads, lr=lr, weight_decay=[0.0, 0.1])

    p = init.clone().requires_grad_()
    opt = sc.StackedAdam([p], lr=lr, weight_decay=[0.0, 0.1])
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step(active=[True, True])
    saved = copy.deepcopy(opt.state_dict())
    q = p.detach().clone().requires_grad_()
    resumed = sc.StackedAdam([q], lr=0.5)  # the loaded groups bring back the per-model lr
    resumed.load_state_dict(saved)
    assert resumed.state[q]["step"].dtype == torch.float32 and resumed.state[q]["step"].tolist() == [3.0, 3.0]
    for g in grads[3:]:
        q.grad = g.clone()
        resumed.step()
    _assert_bitwise(q.detach(), whole, "resumed")


def test_several_parameters_and_groups():
    """Parameters of different shapes (and a 1-D one, e.g. stacked scales) in two groups, one
    with no gradient this step (skipped, as torch's optimizers skip it)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 2, dtype=torch.float64, generator=gen).requires_grad_()
    s = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_()
    idle = torch.randn(3, 2, dtype=torch.float64, generator=gen).requires_grad_()
    a0, s0, idle0 = a.detach().clone(), s.detach().clone(), idle.detach().clone()
    opt = sc.StackedAdam([{"params": [a, idle]}, {"params": [s], "lr": [0.3, 0.2, 0.1]}], lr=[0.01, 0.02, 0.03])
    ga, gs = torch.randn(a.shape, dtype=a.dtype, generator=gen), torch.randn(s.shape, dtype=s.dtype, generator=gen)
    a.grad, s.grad = ga.clone(), gs.clone()
    opt.step()
    assert torch.equal(idle.detach(), idle0)
    for i, (lr_a, lr_s) in enumerate(zip([0.01, 0.02, 0.03], [0.3, 0.2, 0.1])):
        _assert_bitwise(a.detach()[i], _alone(a0, [ga], i, lr=lr_a), f"a, model {i}")
        _assert_bitwise(s.detach()[i], _alone(s0, [gs], i, lr=lr_s), f"s, model {i}")


def test_bad_input():
    """A wrong per-model length, a non-stacked parameter, mixed model counts, a bad mask or a
    bad hyperparameter: ValueError/TypeError naming the argument."""
    p = torch.zeros(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        sc.StackedAdam([p], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="lr"):
        sc.StackedAdam([p], lr=torch.full((3, 1), 0.1))
    with pytest.raises(ValueError, match="weight_decay"):
        sc.StackedAdam([p], weight_decay=[0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="lr"):
        sc.StackedAdam([p], lr=[0.1, -1.0, 0.1])
    with pytest.raises(ValueError, match="lr"):
        sc.StackedAdam([p], lr=float("nan"))
    with pytest.raises(TypeError, match="lr"):
        sc.StackedAdam([p], lr="0.1")
    with pytest.raises(ValueError, match="params"):
        sc.StackedAdam([torch.zeros((), requires_grad=True)])
    with pytest.raises(ValueError, match="params"):
        sc.StackedAdam([p, torch.zeros(4, 2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        sc.StackedAdam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        sc.StackedAdam([p], eps=-1.0)
    with pytest.raises(TypeError, match="eps"):
        sc.StackedAdam([p], eps="1e-8")
    with pytest.raises(TypeError, match="weight_decay"):
        sc.StackedAdam([p], weight_decay=torch.tensor([True, False, True]))
    opt = sc.StackedAdam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="active"):
        opt.step(active=torch.tensor([True, False]))
    with pytest.raises(TypeError, match="active"):
        opt.step(active=torch.tensor([1, 0, 1]))
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])  # a per-model lr assigned later is checked too
    with pytest.raises(ValueError, match="lr"):
        opt.step()


# ---- end to end: SplineODE networks trained together equal the same runs one at a time ----


def _net(seed, amplitude, dtype):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 4, dtype=dtype),
        sc.SplineODE(4, knots=3, degree=2, steps=10, activation="tanh", learn_scale=True,
                     init_amplitude=amplitude, dtype=dtype),
        torch.nn.Linear(4, 1, dtype=dtype))


def _tikhonov(weight, bias):
    return sc.tikhonov([weight, bias])


def test_study_trained_together_equals_one_at_a_time():
    """A small study (float64, one seed per run, per-run lr, init amplitude and regulariser
    weight, one run stopped early) trained as one stack with vmap + StackedAdam equals each run
    trained alone with torch.optim.Adam, to rounding (torch's Linear layers and loss reductions
    round differently under vmap; the SpliNet layer and the optimizer are bit for bit)."""
    skip_unless("cpu", "spline_dense_fwd_models")
    dtype = torch.float64
    seeds, lrs, amps, alphas = [0, 1, 2], [0.01, 0.03, 0.003], [0.1, 0.5, 1.0], [1e-3, 0.0, 1e-2]
    stop_after = [None, 3, None]  # run 1 stops early (its last step is step 3)
    steps = 6
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 2, dtype=dtype, generator=gen), torch.randn(12, 1, dtype=dtype, generator=gen)

    models = [_net(s, a, dtype) for s, a in zip(seeds, amps)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    alpha = torch.tensor(alphas, dtype=dtype)

    def loss(p, b, a):
        fit = torch.nn.functional.mse_loss(functional_call(base, (p, b), (x,)), y)
        return fit + a * _tikhonov(p["1.weight"], p["1.bias"])

    opt = sc.StackedAdam(params.values(), lr=torch.tensor(lrs, dtype=dtype))
    for step in range(steps):
        active = torch.tensor([s is None or step < s for s in stop_after])
        opt.zero_grad()
        vmap(loss, in_dims=(0, 0, 0))(params, buffers, alpha).sum().backward()
        opt.step(active=active)

    for i, (seed, lr, amp, a) in enumerate(zip(seeds, lrs, amps, alphas)):
        net = _net(seed, amp, dtype)
        alone = torch.optim.Adam(net.parameters(), lr=lr)
        for step in range(steps if stop_after[i] is None else stop_after[i]):
            alone.zero_grad()
            fit = torch.nn.functional.mse_loss(net(x), y)
            (fit + a * _tikhonov(net[1].weight, net[1].bias)).backward()
            alone.step()
        for name, p in net.named_parameters():
            torch.testing.assert_close(params[name][i], p.detach(), rtol=1e-12, atol=1e-12, msg=name)
