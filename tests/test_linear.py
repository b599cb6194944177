"""core.linear: oneDNN's products give F.linear's values and gradients, are counted, and compile."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import core.linear
import core.transpose
from core.linear import Linear, _OneDNNLinear, linear
from core.models import DiT, model_config
from op_names import OpNames  # tests/, on pytest's path


def _forward_backward(fn, x, weight, bias, grad):
    """Output and the gradients of x, weight and bias of fn(x, weight, bias) under an upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    if bias is None:
        leaves.append(None)
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("shape, out_features, bias", [
    ((2048, 96), 288, True),  # DiT-N/2's qkv at batch 128: N > K
    ((128, 16, 384), 96, True),  # its fc2 on (N, T, D) tokens: N < K
    ((128, 256), 1536, True),  # DiT-M/2's adaLN: N > K, but g's copy (M·N) the smaller
    ((3, 5, 7), 2, False),  # odd sizes, no bias
])
def test_onednn_linear_gives_f_linears_values_and_gradients(shape, out_features, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    weight = torch.randn(out_features, shape[-1]) / shape[-1] ** 0.5
    b = torch.randn(out_features) if bias else None
    grad = torch.randn(*shape[:-1], out_features)
    ours = _forward_backward(_OneDNNLinear.apply, x, weight, b, grad)
    ref = _forward_backward(F.linear, x.double(), weight.double(), None if b is None else b.double(), grad.double())
    assert len(ours) == len(ref) == (4 if bias else 3)
    for got, want in zip(ours, ref):
        assert got.shape == want.shape
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() < 1e-5 * scale  # fp32 rounding only


def test_onednn_linear_takes_non_contiguous_inputs_and_gradients():
    torch.manual_seed(1)
    x = torch.randn(16, 8, 64).transpose(0, 1)  # (8, 16, 64), not contiguous
    weight = torch.randn(32, 64)
    grad = torch.randn(32, 16, 8).permute(2, 1, 0)  # (8, 16, 32), not contiguous
    ours = _forward_backward(_OneDNNLinear.apply, x, weight, None, grad)
    ref = _forward_backward(F.linear, x, weight, None, grad)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_a_second_derivative_through_onednns_products_is_refused_not_zero():
    # oneDNN's product has no derivative of its own: differentiated again, the gradient's gradient came out as None
    # (a gradient penalty of zero), with only a warning.
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(3, 8, requires_grad=True)
    (grad_x,) = torch.autograd.grad(_OneDNNLinear.apply(x, weight, None).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.square().sum().backward()


def test_linear_leaves_autocast_and_other_dtypes_to_torch():
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's bf16 product, not an fp32 oneDNN one
    assert linear(x.double(), layer.weight.double(), layer.bias.double()).dtype == torch.float64


class _Copies(TorchDispatchMode):
    """Records every copy (clone, copy_, channel shuffle) made inside it, and whether core.transpose made it."""

    def __init__(self):
        super().__init__()
        self.transposing = False
        self.copies = []  # (shape, made by core.transpose)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name() in ("aten::clone", "aten::copy_", "aten::native_channel_shuffle"):
            self.copies.append((tuple(out.shape), self.transposing))
        return out


@pytest.mark.skipif(core.linear._onednn_matmul is None, reason="this torch is built without oneDNN")
@pytest.mark.parametrize("rows, in_features, out_features, transposed", [
    (2048, 96, 288, [(2048, 96), (96, 288)]),  # a block's qkv: x, then (x^T g) into the weight's layout
    (2048, 384, 96, [(2048, 96)]),  # its fc2: g
    (128, 256, 1536, [(128, 1536)]),  # the adaLN: g (197k floats) rather than x and the result (426k)
])
def test_the_weight_gradient_copies_the_fewer_floats(monkeypatch, rows, in_features, out_features, transposed):
    monkeypatch.setattr(core.linear, "ONEDNN_PREFERRED", True)  # as on an AVX-512 CPU that is not Intel's
    layer = Linear(in_features, out_features)
    out = layer(torch.randn(rows, in_features, requires_grad=True))
    recorded, made = _Copies(), []

    def recording_transposed(x):
        made.append(tuple(x.shape))
        recorded.transposing = True
        try:
            return core.transpose.transposed(x)
        finally:
            recorded.transposing = False
    monkeypatch.setattr(core.linear, "transposed", recording_transposed)
    with recorded:
        out.backward(torch.randn(rows, out_features))
    assert sorted(made) == sorted(transposed)
    assert recorded.copies and all(by_transpose for _, by_transpose in recorded.copies)  # none of autograd's own
    assert layer.weight.grad.is_contiguous()


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() sets TF32 too
def test_torchs_mkldnn_switch_turns_onednn_off(monkeypatch):
    monkeypatch.setattr(core.linear, "ONEDNN_PREFERRED", True)  # as on an AVX-512 CPU that is not Intel's
    x, weight, bias = torch.randn(64, 96), torch.randn(288, 96), torch.randn(288)
    with OpNames() as on:
        linear(x, weight, bias)
    with torch.backends.mkldnn.flags(enabled=False), OpNames() as off:
        linear(x, weight, bias)
    assert "mkldnn::_linear_pointwise" in on.names
    assert "mkldnn::_linear_pointwise" not in off.names and "aten::addmm" in off.names


def test_flop_counter_counts_onednns_products_like_torchs():
    x = torch.randn(64, 96, requires_grad=True)
    weight = torch.randn(288, 96, requires_grad=True)
    counts = []
    for fn in (_OneDNNLinear.apply, F.linear):
        with FlopCounterMode(display=False) as counter:
            fn(x, weight, None).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 64 * 96 * 288  # forward, input and weight gradients


def test_dit_trains_alike_through_onednn_and_torch(monkeypatch):
    """A DiT's loss and gradients are the same, to fp32 rounding, whichever library multiplies."""
    torch.manual_seed(0)
    model = DiT(**model_config("DiT-N/2"))
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # adaLN-Zero would zero most gradients
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    x, t, y = torch.randn(32, 1, 8, 8), torch.randint(0, 1000, (32,)), torch.randint(0, 10, (32,))
    results = []
    for onednn in (True, False):
        monkeypatch.setattr(core.linear, "ONEDNN_PREFERRED", onednn)
        model.zero_grad()
        torch.manual_seed(1)  # the same labels dropped for guidance
        loss = model(x, t, y).square().mean()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert len(grads_a) == len(grads_b) > 50
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_onednn_linear_matches_eager():
    """Under torch.compile the products stay oneDNN's (inductor lowers mkldnn's op only for frozen weights)."""
    torch.manual_seed(2)
    layer1, layer2 = Linear(32, 64), Linear(64, 16)

    def mlp(x):
        h = _OneDNNLinear.apply(x, layer1.weight, layer1.bias)
        return _OneDNNLinear.apply(F.gelu(h, approximate="tanh"), layer2.weight, layer2.bias)

    x = torch.randn(128, 32)
    eager = mlp(x)
    eager.square().sum().backward()
    # Both weight-gradient forms: layer1's transposes its input (wider output), layer2's its output gradient.
    eager_grads = [layer.weight.grad.clone() for layer in (layer1, layer2)]
    layer1.weight.grad = layer2.weight.grad = None
    compiled = torch.compile(mlp, fullgraph=True)(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for layer, eager_grad in zip((layer1, layer2), eager_grads):
        torch.testing.assert_close(layer.weight.grad, eager_grad, rtol=1e-5, atol=1e-6)
