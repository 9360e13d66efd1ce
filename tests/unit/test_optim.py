"""Tests for lmforge.engine.optim: each optimizer against its update rule written out by hand,
LAMB resume, weight-decay groups, config validation."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from lmforge.config import ConfigError, field_docs, load_config
from lmforge.engine.optim import LAMB, OptimConfig, build_optimizer, param_groups

X0 = [[1.0, -2.0], [0.5, 3.0]]
G1 = [[0.3, -0.1], [2.0, 0.05]]
G2 = [[-0.2, 0.4], [1.0, -0.5]]


class One(nn.Module):
    """A single 2x2 float64 matrix, so it lands in the decayed group."""

    def __init__(self, x0=X0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(x0, dtype=torch.float64))


def run(cfg: OptimConfig, grads, x0=X0) -> list[torch.Tensor]:
    """Build the optimizer for ``One`` and step once per gradient; return the params after each."""
    model = One(x0)
    opt = build_optimizer(model, cfg)
    out = []
    for g in grads:
        model.w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(model.w.detach().clone())
    return out


def t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# ----------------------------------------------------------------------------- torch optimizers

def test_sgd_with_l2_decay():
    lr, wd = 0.1, 0.01
    x1, x2 = run(OptimConfig(name="sgd", lr=lr, weight_decay=wd, fused=False), [G1, G2])
    e1 = t(X0) - lr * (t(G1) + wd * t(X0))
    e2 = e1 - lr * (t(G2) + wd * e1)
    torch.testing.assert_close(x1, e1)
    torch.testing.assert_close(x2, e2)


def test_momentum_two_steps():
    lr, mu = 0.1, 0.9
    x1, x2 = run(OptimConfig(name="momentum", lr=lr, momentum=mu, weight_decay=0.0), [G1, G2])
    b1 = t(G1)                       # torch: the first buffer is the gradient itself
    e1 = t(X0) - lr * b1
    b2 = mu * b1 + t(G2)
    e2 = e1 - lr * b2
    torch.testing.assert_close(x1, e1)
    torch.testing.assert_close(x2, e2)


def test_nesterov_two_steps():
    lr, mu = 0.1, 0.9
    x1, x2 = run(OptimConfig(name="nesterov", lr=lr, momentum=mu, weight_decay=0.0), [G1, G2])
    b1 = t(G1)
    e1 = t(X0) - lr * (t(G1) + mu * b1)
    b2 = mu * b1 + t(G2)
    e2 = e1 - lr * (t(G2) + mu * b2)
    torch.testing.assert_close(x1, e1)
    torch.testing.assert_close(x2, e2)


def _adam_direction(grads, b1, b2, eps):
    """Yield m̂/(√v̂+ε) for each step, computed with plain Python floats per element."""
    m = [[0.0, 0.0], [0.0, 0.0]]
    v = [[0.0, 0.0], [0.0, 0.0]]
    for step, g in enumerate(grads, start=1):
        d = [[0.0, 0.0], [0.0, 0.0]]
        for i in range(2):
            for j in range(2):
                m[i][j] = b1 * m[i][j] + (1 - b1) * g[i][j]
                v[i][j] = b2 * v[i][j] + (1 - b2) * g[i][j] ** 2
                mh = m[i][j] / (1 - b1 ** step)
                vh = v[i][j] / (1 - b2 ** step)
                d[i][j] = mh / (math.sqrt(vh) + eps)
        yield t(d)


def test_adam_bias_correction_and_l2_decay():
    lr, wd, (b1, b2), eps = 0.1, 0.05, (0.9, 0.95), 1e-8
    cfg = OptimConfig(name="adam", lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps, fused=False)
    x1, x2 = run(cfg, [G1, G2])
    # L2: the decay term joins the gradient *before* the moments; step 2 sees x1.
    g1 = (t(G1) + wd * t(X0)).tolist()
    e1 = t(X0) - lr * next(_adam_direction([g1], b1, b2, eps))
    g2 = (t(G2) + wd * e1).tolist()
    dirs = list(_adam_direction([g1, g2], b1, b2, eps))
    e2 = e1 - lr * dirs[1]
    torch.testing.assert_close(x1, e1)
    torch.testing.assert_close(x2, e2)


def test_adamw_decoupled_decay():
    lr, wd, (b1, b2), eps = 0.1, 0.05, (0.9, 0.95), 1e-8
    cfg = OptimConfig(name="adamw", lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    x1, x2 = run(cfg, [G1, G2])
    d1, d2 = _adam_direction([G1, G2], b1, b2, eps)   # moments see the raw gradient
    e1 = t(X0) * (1 - lr * wd) - lr * d1
    e2 = e1 * (1 - lr * wd) - lr * d2
    torch.testing.assert_close(x1, e1)
    torch.testing.assert_close(x2, e2)
    # the first Adam step moves every element by ~lr regardless of gradient scale
    torch.testing.assert_close(d1.abs(), torch.ones(2, 2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_adam_and_adamw_differ_with_decay():
    cfg = dict(lr=0.1, weight_decay=0.5)
    (a,) = run(OptimConfig(name="adam", **cfg), [G1])
    (w,) = run(OptimConfig(name="adamw", **cfg), [G1])
    assert not torch.allclose(a, w)


@pytest.mark.parametrize("name, cls", [
    ("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD), ("nesterov", torch.optim.SGD),
    ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("lamb", LAMB),
])
def test_builder_types_and_hyperparameters(name, cls):
    cfg = OptimConfig(name=name, lr=0.02, weight_decay=0.3, momentum=0.8, betas=(0.8, 0.9), eps=1e-7)
    opt = build_optimizer(One(), cfg)
    assert type(opt) is cls
    g = opt.param_groups[0]
    assert g["lr"] == 0.02 and g["weight_decay"] == 0.3 and g["names"] == ["w"]
    if name == "sgd":
        assert g["momentum"] == 0 and not g["nesterov"]
    elif name in ("momentum", "nesterov"):
        assert g["momentum"] == 0.8 and g["nesterov"] == (name == "nesterov")
    else:
        assert tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-7


def test_fused_flag():
    off = build_optimizer(One(), OptimConfig(name="adamw", fused=False))
    assert off.defaults["fused"] is False and off.defaults["foreach"] is False
    auto = build_optimizer(One(), OptimConfig(name="adamw", fused=None))  # CPU params: torch default
    assert not auto.defaults["fused"]


# ----------------------------------------------------------------------------- LAMB

def _lamb_reference(x0, grads, lr, b1, b2, eps, wd):
    """You et al. 2019, Algorithm 2, in plain Python floats over a flat list of numbers."""
    x = list(x0)
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    out = []
    for step, g in enumerate(grads, start=1):
        r = []
        for i in range(len(x)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            mh = m[i] / (1 - b1 ** step)
            vh = v[i] / (1 - b2 ** step)
            r.append(mh / (math.sqrt(vh) + eps) + wd * x[i])
        xn = math.sqrt(sum(a * a for a in x))
        rn = math.sqrt(sum(a * a for a in r))
        ratio = xn / rn if xn > 0 and rn > 0 else 1.0
        x = [a - lr * ratio * b for a, b in zip(x, r)]
        out.append(list(x))
    return out


def _flat(rows):
    return [a for row in rows for a in row]


def test_lamb_matches_algorithm_2():
    lr, (b1, b2), eps, wd = 0.05, (0.9, 0.99), 1e-6, 0.1
    x1, x2 = run(OptimConfig(name="lamb", lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd), [G1, G2])
    e1, e2 = _lamb_reference(_flat(X0), [_flat(G1), _flat(G2)], lr, b1, b2, eps, wd)
    torch.testing.assert_close(x1.flatten(), t(e1))
    torch.testing.assert_close(x2.flatten(), t(e2))
    # the trust ratio makes every step's size exactly lr * ||x||
    torch.testing.assert_close((x1 - t(X0)).norm(), lr * t(X0).norm())
    torch.testing.assert_close((x2 - x1).norm(), lr * x1.norm())


def test_lamb_zero_norm_parameter_uses_ratio_one():
    lr, (b1, b2), eps = 0.05, (0.9, 0.99), 1e-6
    zero = [[0.0, 0.0], [0.0, 0.0]]
    (x1,) = run(OptimConfig(name="lamb", lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.1), [G1], x0=zero)
    # ||x|| = 0: ratio 1, r = g/(|g| + eps) (+ λ·0), so x1 = -lr * g/(|g|+eps)
    e1 = -lr * t(G1) / (t(G1).abs() + eps)
    torch.testing.assert_close(x1, e1)
    (ref,) = _lamb_reference(_flat(zero), [_flat(G1)], lr, b1, b2, eps, 0.1)
    torch.testing.assert_close(x1.flatten(), t(ref))
    # zero gradient and no decay: ||r|| = 0, ratio 1, the parameter stays put (no NaN)
    (x,) = run(OptimConfig(name="lamb", lr=lr, weight_decay=0.0), [zero])
    torch.testing.assert_close(x, t(X0))


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.lin = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)


def _grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def test_lamb_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    cfg = OptimConfig(name="lamb", lr=0.01, weight_decay=0.1)
    a = Small()
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, cfg), build_optimizer(b, cfg)
    for s in range(3):
        _grads(a, s)
        opt_a.step()
    _grads(b, 0)
    opt_b.step()
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "optim": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    c = Small()
    c.load_state_dict(saved["model"])
    opt_c = build_optimizer(c, cfg)
    opt_c.load_state_dict(saved["optim"])
    for s in (1, 2):
        _grads(c, s)
        opt_c.step()
    for (name, pa), pc in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(pa, pc), name
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert opt_a.state[pa]["step"] == opt_c.state[pc]["step"] == 3
        assert torch.equal(opt_a.state[pa]["exp_avg_sq"], opt_c.state[pc]["exp_avg_sq"])
    # without the loaded state the result differs, so the check above has teeth
    d = Small()
    d.load_state_dict(saved["model"])
    opt_d = build_optimizer(d, cfg)
    for s in (1, 2):
        _grads(d, s)
        opt_d.step()
    assert not torch.equal(a.lin.weight, d.lin.weight)


def test_lamb_closure_and_constructor_errors():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LAMB([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(5.0)
    assert not torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    for kwargs in ({"lr": 0.0}, {"betas": (1.0, 0.9)}, {"eps": 0.0}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError):
            LAMB([nn.Parameter(torch.zeros(2))], **kwargs)


# ----------------------------------------------------------------------------- weight-decay groups

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(10, 4)                 # an embedding whose name says nothing
        self.pos_emb = nn.Parameter(torch.zeros(3, 4))    # "emb" in the name but not an nn.Embedding
        self.proj = nn.Linear(4, 4)                       # weight decays, bias does not
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(()))         # 0-D
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.tokens.weight             # tied: counted once, as an embedding


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_param_groups_decay_exactly_matrices(decay_embeddings):
    groups = param_groups(Net(), 0.1, decay_embeddings=decay_embeddings)
    by_wd = {g["weight_decay"]: g["names"] for g in groups}
    assert len(groups) == 2 and groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    if decay_embeddings:
        assert by_wd[0.1] == ["pos_emb", "tokens.weight", "proj.weight"]
        assert by_wd[0.0] == ["scale", "proj.bias", "norm.weight", "norm.bias"]
    else:
        assert by_wd[0.1] == ["pos_emb", "proj.weight"]
        assert by_wd[0.0] == ["scale", "tokens.weight", "proj.bias", "norm.weight", "norm.bias"]
    net_params = dict(Net().named_parameters())
    for g in groups:  # names line up with the tensors
        assert [tuple(p.shape) for p in g["params"]] == [tuple(net_params[n].shape) for n in g["names"]]


def test_param_groups_order_follows_named_parameters():
    net = Net()
    groups = param_groups(net, 0.1)
    order = [n for n, p in net.named_parameters() if p.requires_grad]
    assert sorted(n for g in groups for n in g["names"]) == sorted(order)
    for g in groups:
        assert g["names"] == [n for n in order if n in g["names"]]
        assert all(p is dict(net.named_parameters())[n] for p, n in zip(g["params"], g["names"]))


def test_groups_reach_the_optimizer():
    net = Net()
    opt = build_optimizer(net, OptimConfig(name="adamw", weight_decay=0.2))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert opt.param_groups[1]["names"][1] == "tokens.weight"
    only_vectors = nn.LayerNorm(4)
    (g,) = build_optimizer(only_vectors, OptimConfig()).param_groups  # empty groups are dropped
    assert g["weight_decay"] == 0.0
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(frozen, OptimConfig())


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, key", [
    ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"betas": (1.0, 0.9)}, "betas"), ({"betas": (0.9, -0.1)}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"eps": 0.0}, "eps"),
    ({"momentum": 1.0}, "momentum"), ({"momentum": -0.5}, "momentum"),
    ({"name": "nesterov", "momentum": 0.0}, "momentum"), ({"name": "rmsprop"}, "name"),
])
def test_validate_rejects(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OptimConfig(**kwargs).validate()
    with pytest.raises(ValueError):
        build_optimizer(One(), OptimConfig(**kwargs))


def test_validate_accepts_defaults_and_config_loader_reports_key():
    OptimConfig().validate()
    assert OptimConfig().name == "adamw" and OptimConfig().weight_decay == 0.1
    with pytest.raises(ConfigError, match="lr"):
        load_config(OptimConfig, overrides=["lr=0"])
    cfg = load_config(OptimConfig, overrides=["name=lamb", "betas=[0.9,0.999]"])
    assert cfg.name == "lamb" and cfg.betas == (0.9, 0.999)
    docs = field_docs(OptimConfig)
    assert set(docs) == {"name", "lr", "weight_decay", "betas", "eps", "momentum", "decay_embeddings", "fused"}
