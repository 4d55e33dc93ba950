"""The fused passes (methods/fused.py) equal the plain formulas, and the layers use them only when
that is safe. All math checks in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lowrank.methods import vera
from lightning_lowrank.methods.adalora import AdaLoRA, AdaLoRALayer
from lightning_lowrank.methods.base import weight_oi
from lightning_lowrank.methods.dora import DoRA, DoRALayer, DoRASingLoRALayer
from lightning_lowrank.methods.fused import LowRankLinear, fusable
from lightning_lowrank.methods.lora import LoRA, LoRALayer
from lightning_lowrank.methods.singlora import SingLoRA, SingLoRALayer
from lightning_lowrank.methods.vera import VeRA, VeRALinear, vera_prefers_dense

D = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _t(*shape, grad=False):
    return torch.randn(*shape, dtype=D).requires_grad_(grad)


# --- the autograd functions -----------------------------------------------------------------
@pytest.mark.parametrize("with_factor", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("separate_adapter_input", [False, True])
@pytest.mark.parametrize("train_a", [False, True])
def test_low_rank_linear_gradcheck(with_factor, with_bias, separate_adapter_input, train_a):
    torch.manual_seed(0)
    x = _t(2, 3, 5, grad=True)
    xa = _t(2, 3, 5, grad=True) if separate_adapter_input else x
    w0, bias = _t(4, 5, grad=True), (_t(4, grad=True) if with_bias else None)
    a, b = _t(3, 5, grad=train_a), _t(4, 3, grad=True)
    factor = _t(4, grad=True) if with_factor else None

    def fn(x, xa, w0, bias, a, b, factor):
        return LowRankLinear.apply(x, xa, w0, bias, a, b, 1.7, factor)

    inputs = (x, None if xa is x else xa, w0, bias, a, b, factor)
    assert torch.autograd.gradcheck(fn, inputs)
    # and the value is the formula
    z = x @ w0.T + 1.7 * (xa @ a.T) @ b.T
    expected = (z if factor is None else factor * z) + (0 if bias is None else bias)
    torch.testing.assert_close(fn(*inputs), expected, **TOL)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_vera_linear_gradcheck(with_bias, train_base):
    torch.manual_seed(0)
    x = _t(2, 3, 5, grad=True)
    w0, bias = _t(4, 5, grad=train_base), (_t(4, grad=train_base) if with_bias else None)
    a, b = _t(6, 5), _t(4, 6)  # the frozen pair, rank 6 above min(out, in) as VeRA allows
    d, lam_b = _t(6, grad=True), _t(4, grad=True)
    assert torch.autograd.gradcheck(VeRALinear.apply, (x, w0, bias, a, b, d, lam_b))
    expected = x @ (w0 + lam_b[:, None] * (b * d) @ a).T + (0 if bias is None else bias)
    torch.testing.assert_close(VeRALinear.apply(x, w0, bias, a, b, d, lam_b), expected, **TOL)


def test_vera_prefers_dense_is_the_multiply_add_count():
    out, inp, r = 6, 4, 5
    for tokens in range(1, 8):
        factored = 2 * tokens * r * (inp + out)
        dense = out * r * inp + tokens * r * (inp + out)
        assert vera_prefers_dense(tokens, out, inp) == (dense < factored)


def test_double_backward_is_refused():
    x = _t(3, 5, grad=True)
    y = LowRankLinear.apply(
        x, None, _t(4, 5), None, _t(2, 5, grad=True), _t(4, 2, grad=True), 1.0, None
    )
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|requires grad"):
        g.sum().backward()


# --- the layers -------------------------------------------------------------------------------
def _base(out=10, inp=6, bias=True, kind="linear"):
    torch.manual_seed(0)
    if kind == "conv1d":  # GPT-2's layer: weight stored (in, out), always a bias
        base = Conv1D(out, inp).to(D)
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(inp, out, bias=bias).to(D)
    base.requires_grad_(False)
    return base


def _randomise(layer: nn.Module) -> None:
    """Non-trivial adapter parameters (B = 0 or b = 0 at init would hide a wrong path)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
        if hasattr(layer, "step"):
            layer.set_step(3)  # SingLoRA mid-ramp


def _reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The method's formula through plain autograd, with the dense weight."""
    base = layer.base
    w0 = weight_oi(base)
    if isinstance(layer, (DoRALayer, DoRASingLoRALayer)):
        b, a, c = layer.direction_factors()
        v = w0 + c * b @ a
        norm = torch.linalg.vector_norm(v, dim=1).detach()  # a constant in backward (paper)
        return F.linear(x, layer.magnitude[:, None] * v / norm[:, None], base.bias)
    if hasattr(layer, "vera_lambda_d"):
        b, a = layer.shared_slices()
        dw = layer.vera_lambda_b[:, None] * (b * layer.vera_lambda_d) @ a
        return F.linear(x, w0 + dw, base.bias)
    if isinstance(layer, AdaLoRALayer):
        b = layer.lora_B * layer.lora_E
        return base(x) + layer.scale * (x @ layer.lora_A.T) @ b.T
    if isinstance(layer, SingLoRALayer):
        b, a, c = layer.low_rank_factors()
        return base(x) + c * (x @ a.T) @ b.T
    return base(x) + layer.scale * (x @ layer.lora_A.T) @ layer.lora_B.T


def _grads(layer, x, out):
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=D)
    params = [p for p in layer.parameters() if p.requires_grad]
    return torch.autograd.grad((out * weights).sum(), [x, *params])


def _count_calls(monkeypatch, cls):
    calls = []
    original = cls.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(cls, "apply", counting)
    return calls


LAYERS = {
    "lora": lambda base: LoRALayer(base, LoRA(rank=3, alpha=5.0)),
    "lora-fa": lambda base: LoRALayer(base, LoRA(rank=3, alpha=5.0, train_a=False)),
    "rslora": lambda base: LoRALayer(base, LoRA(rank=3, alpha=5.0, scaling="rslora")),
    "adalora": lambda base: AdaLoRALayer(base, AdaLoRA(init_rank=3, target_rank=2, alpha=5.0)),
    "singlora": lambda base: SingLoRALayer(base, SingLoRA(rank=3, alpha=5.0, ramp_steps=10)),
    "dora": lambda base: DoRALayer(base, DoRA(rank=3, alpha=5.0)),
    "dora-singlora": lambda base: DoRASingLoRALayer(
        base, DoRA(rank=3, alpha=5.0, delta="singlora", ramp_steps=10)
    ),
}


@pytest.mark.parametrize("base_kind", ["linear", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 6), (6,)])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_low_rank_layers_take_the_fused_pass_and_match_the_formula(
    monkeypatch, kind, shape, base_kind
):
    base = _base(bias=base_kind != "linear-nobias", kind=base_kind.split("-")[0])
    layer = LAYERS[kind](base)
    _randomise(layer)
    calls = _count_calls(monkeypatch, LowRankLinear)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    out = layer(x)
    assert calls, "the fused pass was not taken"
    expected = _reference(layer, x)
    assert out.shape == expected.shape == (*shape[:-1], 10)
    torch.testing.assert_close(out, expected, **TOL)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, expected), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_lora_dropout_in_the_fused_pass_equals_the_generic_path():
    layer = LoRALayer(_base(), LoRA(rank=3, alpha=5.0, dropout=0.5)).train()
    _randomise(layer)
    x = torch.randn(7, 6, dtype=D, requires_grad=True)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)  # the same dropout mask: one draw of x's shape in both paths
    expected = layer.base(x) + layer.adapter_forward(x)
    torch.testing.assert_close(out, expected, **TOL)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, expected), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_lora_fa_keeps_the_rank_space_not_the_input():
    # LoRA-FA's memory saving: with A frozen, backward needs x A^T (r per token), not x
    layer = LoRALayer(_base(out=10, inp=6), LoRA(rank=3, alpha=5.0, train_a=False))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    x = torch.randn(7, 6, dtype=D)  # the first adapted layer: no gradient to the input
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert (7, 3) in shapes or (3, 7) in shapes  # x A^T, in either orientation
    assert (7, 6) not in shapes
    shapes.clear()
    full = LoRALayer(_base(out=10, inp=6), LoRA(rank=3, alpha=5.0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full(x)
    assert (7, 6) in shapes  # plain LoRA keeps x for A's gradient


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("tokens", [2, 40])
@pytest.mark.parametrize("grad", [True, False])
def test_vera_picks_the_cheaper_order_and_both_match_the_formula(
    monkeypatch, tokens, grad, base_kind
):
    base = _base(out=10, inp=6, kind=base_kind)
    (layer,) = VeRA(rank=8, seed=0).build({"l": base}).values()
    _randomise(layer)
    dense = vera_prefers_dense(tokens, 10, 6)
    assert dense == (tokens == 40)  # 40 * 16 > 60 > 2 * 16
    calls = _count_calls(monkeypatch, VeRALinear)
    x = torch.randn(tokens, 6, dtype=D, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = layer(x)
        expected = _reference(layer, x)
    assert bool(calls) == (dense and grad)  # without autograd the dense order needs no Function
    torch.testing.assert_close(out, expected, **TOL)
    if grad:
        for got, want in zip(_grads(layer, x, out), _grads(layer, x, expected), strict=True):
            torch.testing.assert_close(got, want, **TOL)


def test_vera_without_autograd_uses_one_dense_matmul(monkeypatch):
    base = _base(out=10, inp=6)
    (layer,) = VeRA(rank=8, seed=0).build({"l": base}).values()
    _randomise(layer)
    linear_calls = []
    original = F.linear

    def spy(x, w, b=None):
        linear_calls.append(tuple(w.shape))
        return original(x, w, b)

    monkeypatch.setattr(vera.F, "linear", spy)
    with torch.no_grad():
        layer(torch.randn(40, 6, dtype=D))
    assert linear_calls == [(10, 6)]


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _OwnConv1DForward(Conv1D):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "case",
    [
        "hook",
        "pre_hook",
        "backward_hook",
        "global_hook",
        "global_backward_hook",
        "subclass",
        "conv1d_subclass",
        "dtype",
        "autocast",
    ],
)
def test_fusable_refuses_what_it_cannot_reproduce(case):
    base = _base()
    x = torch.randn(3, 6, dtype=D)
    handle = None
    assert fusable(base, x)
    if case == "hook":
        handle = base.register_forward_hook(lambda m, i, o: None)
    elif case == "pre_hook":
        handle = base.register_forward_pre_hook(lambda m, i: None)
    elif case == "backward_hook":
        handle = base.register_full_backward_hook(lambda m, gi, go: None)
    elif case == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    elif case == "global_backward_hook":
        handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    elif case == "subclass":
        base = _OwnForward(6, 10).to(D)
    elif case == "conv1d_subclass":
        assert fusable(_base(kind="conv1d"), x)  # GPT-2's own Conv1D is fused
        base = _OwnConv1DForward(10, 6).to(D)
    elif case == "dtype":
        x = x.float()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fusable(base, x)
    else:
        assert not fusable(base, x)
    if handle is not None:
        handle.remove()
        assert fusable(base, x)


@pytest.mark.parametrize("kind", ["lora", "adalora", "singlora", "dora"])
def test_layers_with_a_hooked_base_take_the_generic_path(monkeypatch, kind):
    # LoRA-drop reads the base output through a hook on the base layer: it must still fire
    layer = LAYERS[kind](_base())
    _randomise(layer)
    seen = []
    layer.base.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    calls = _count_calls(monkeypatch, LowRankLinear)
    x = torch.randn(2, 6, dtype=D)
    out = layer(x)
    assert not calls and len(seen) == 1
    torch.testing.assert_close(seen[0], layer.base(x))
    torch.testing.assert_close(out, _reference(layer, x), **TOL)


def test_merged_layers_run_the_base_only(monkeypatch):
    layer = LAYERS["lora"](_base())
    _randomise(layer)
    x = torch.randn(3, 6, dtype=D)
    before = layer(x).detach()
    layer.merge()
    calls = _count_calls(monkeypatch, LowRankLinear)
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)
    assert not calls


def _two_layer_model(kind: str, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10, bias=bias), nn.Tanh(), nn.Linear(10, 6, bias=bias))
    model = model.to(D)
    model.requires_grad_(False)
    for i in (0, 2):
        if kind == "vera":
            (model[i],) = VeRA(rank=8, seed=0).build({"l": model[i]}).values()
        else:
            model[i] = LAYERS[kind](model[i])
        _randomise(model[i])
    return model


def _loss_and_grads(model: nn.Module, x: torch.Tensor, run) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = run(model, x).square().sum()
    loss.backward()  # not autograd.grad, which reentrant checkpointing refuses
    return [loss.detach(), x.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_activation_checkpointing_recomputes_the_fused_pass_exactly(kind, reentrant):
    from torch.utils.checkpoint import checkpoint

    model = _two_layer_model(kind)
    x = torch.randn(40, 6, dtype=D)
    plain = _loss_and_grads(model, x, lambda m, t: m(t))
    ckpt = _loss_and_grads(model, x, lambda m, t: checkpoint(m, t, use_reentrant=reentrant))
    for got, want in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize(
    "kind, bias", [("lora", True), ("dora", True), ("dora", False), ("vera", True)]
)
def test_torch_compile_traces_the_fused_pass(kind, bias):
    # aot_eager: dynamo and AOTAutograd trace the autograd.Function without generating code.
    # DoRA without a bias: eager recovers the magnitude's gradient from the output, compiled
    # keeps z (no branch on the factor's values in the graph); the same gradients either way
    model = _two_layer_model(kind, bias)
    x = torch.randn(40, 6, dtype=D)
    eager = _loss_and_grads(model, x, lambda m, t: m(t))
    compiled_model = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled = _loss_and_grads(compiled_model, x, lambda m, t: m(t))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, **TOL)


# --- DoRA: the factor's gradient from the output ----------------------------------------------
def _saved_storages(fn):
    """``fn()`` and the storage pointers of every tensor autograd saved while it ran."""
    ptrs = []

    def pack(t):
        ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, ptrs


def _dora_formula_grads(layer, x, gy):
    """Gradients of x, m, A, B through the paper's formula (plain autograd, norm detached)."""
    x = x.detach().clone().requires_grad_(True)
    m, a, b = (
        p.detach().clone().requires_grad_(True)
        for p in (layer.magnitude, layer.lora_A, layer.lora_B)
    )
    w0, s = layer.base.weight, layer.scale
    z = x @ w0.T + s * (x @ a.T) @ b.T
    y = (m / torch.linalg.vector_norm(w0 + s * b @ a, dim=1).detach()) * z
    if layer.base.bias is not None:
        y = y + layer.base.bias
    y.backward(gy)
    return [x.grad, m.grad, a.grad, b.grad]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("zero_magnitude", [False, True])
def test_dora_keeps_its_output_rather_than_a_second_copy_when_exact(bias, zero_magnitude):
    layer = DoRALayer(_base(out=10, inp=6, bias=bias), DoRA(rank=3, alpha=5.0))
    _randomise(layer)
    if zero_magnitude:  # z cannot be recovered from f * z there: z is kept instead
        with torch.no_grad():
            layer.magnitude[3] = 0.0
    x = torch.randn(7, 6, dtype=D, requires_grad=True)
    y, ptrs = _saved_storages(lambda: layer(x))
    from_output = not bias and not zero_magnitude
    assert (y.untyped_storage().data_ptr() in ptrs) == from_output
    assert len(ptrs) == len(set(ptrs))  # one (tokens, out) tensor, never y and z both
    gy = torch.randn_like(y)
    y.backward(gy)
    got = [x.grad, layer.magnitude.grad, layer.lora_A.grad, layer.lora_B.grad]
    for g, w in zip(got, _dora_formula_grads(layer, x, gy), strict=True):
        torch.testing.assert_close(g, w, **TOL)
    assert torch.isfinite(layer.magnitude.grad).all()


def test_dora_output_changed_in_place_is_refused_with_the_fix():
    layer = DoRALayer(_base(out=10, inp=6, bias=False), DoRA(rank=3, alpha=5.0))
    _randomise(layer)
    y = layer(torch.randn(7, 6, dtype=D, requires_grad=True))
    nn.ReLU(inplace=True)(y)
    with pytest.raises(RuntimeError, match="changed the layer's output in place.*out of place"):
        y.sum().backward()
    # with a bias z is kept, and the in-place change is fine, as for every other layer
    layer = DoRALayer(_base(out=10, inp=6, bias=True), DoRA(rank=3, alpha=5.0))
    y = layer(torch.randn(7, 6, dtype=D, requires_grad=True))
    nn.ReLU(inplace=True)(y).sum().backward()
    assert layer.magnitude.grad is not None


def test_dora_saves_less_for_backward_in_a_llama(monkeypatch):
    from benchmarks.tensor_bytes import saved_tensor_bytes
    from lightning_lowrank import inject
    from lightning_lowrank.methods import fused
    from tests.conftest import tiny_llama

    model = tiny_llama(hidden_size=32, intermediate_size=64).train()
    inject(model, DoRA(rank=4), target_modules=r".*(q|k|v|o|gate|up|down)_proj")
    ids = torch.randint(0, 64, (2, 16))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    kept_output = saved_tensor_bytes(lambda: model(input_ids=ids).logits.sum(), exclude=frozen)
    monkeypatch.setattr(fused, "_recoverable", lambda factor, bias: False)
    kept_z = saved_tensor_bytes(lambda: model(input_ids=ids).logits.sum(), exclude=frozen)
    # the gate and up outputs are kept anyway, by the activation and by the product: recovering
    # z from them frees those layers' z (Llama's projections have no bias)
    tokens, inter, layers = 32, 64, 2
    freed = layers * 2 * tokens * inter * 4  # gate and up, float32
    assert kept_z - kept_output >= freed


@pytest.mark.parametrize("shape", [(7, 6), (2, 7, 6)])
@pytest.mark.parametrize("kind", ["lora", "dora_with_bias"])
def test_an_in_place_op_after_a_fused_layer_is_allowed(kind, shape):
    # the fused pass returns a tensor of its own, not a view: nn.ReLU(inplace=True) after it
    # works as after a plain nn.Linear (it used to be refused as a view modified in place)
    if kind == "lora":
        layer = LoRALayer(_base(out=10, inp=6), LoRA(rank=3, alpha=5.0))
    else:
        layer = DoRALayer(_base(out=10, inp=6, bias=True), DoRA(rank=3, alpha=5.0))
    _randomise(layer)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    y = layer(x)
    assert y._base is None
    gy = torch.randn_like(y)
    want = y.detach().clamp_min(0)
    nn.ReLU(inplace=True)(y).backward(gy)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref = F.relu(layer(x))  # the out-of-place reference
    torch.testing.assert_close(ref, want, **TOL)
    ref.backward(gy)
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, **TOL)
