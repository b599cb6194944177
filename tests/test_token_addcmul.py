"""core.token_addcmul: torch's addcmul with a per-image factor, bitwise, with a backward of one pass fewer."""
import pytest
import torch

from core.models import DiTBlock
from core.token_addcmul import token_addcmul

N, T, D = 6, 16, 40


def with_grads(base, factor, tokens):
    return [t.clone().requires_grad_() for t in (base, factor, tokens)]


def torch_addcmul(base, factor, tokens):
    """What core's DiT computed before: addcmul with the per-image operands unsqueezed over the tokens."""
    base = base.unsqueeze(1) if base.dim() == 2 else base
    return torch.addcmul(base, tokens, factor.unsqueeze(1))


@pytest.mark.parametrize("base_shape", [(N, D), (N, T, D)], ids=["shift per image", "residual tokens"])
def test_values_and_gradients_are_bitwise_torchs(base_shape):
    g = torch.Generator().manual_seed(0)
    operands = [torch.randn(s, generator=g) for s in (base_shape, (N, D), (N, T, D))]
    grad = torch.randn(N, T, D, generator=g)
    ours, theirs = with_grads(*operands), with_grads(*operands)
    y = token_addcmul(*ours)
    assert type(y.grad_fn).__name__ == "_TokenAddcmulBackward"
    want = torch_addcmul(*theirs)
    assert y.shape == (N, T, D) and torch.equal(y, want)
    y.backward(grad)
    want.backward(grad)
    for a, b in zip(ours, theirs):
        assert a.grad.shape == a.shape and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("base_shape", [(3, 5), (3, 4, 5)], ids=["shift per image", "residual tokens"])
def test_backward_is_the_derivative_of_the_forward(base_shape):
    g = torch.Generator().manual_seed(1)
    operands = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                for s in (base_shape, (3, 5), (3, 4, 5))]
    assert torch.autograd.gradcheck(token_addcmul, operands)


def test_only_the_gradients_asked_for():
    g = torch.Generator().manual_seed(2)
    base, factor, tokens = (torch.randn(N, T, D, generator=g), torch.randn(N, D, generator=g).requires_grad_(),
                            torch.randn(N, T, D, generator=g))
    token_addcmul(base, factor, tokens).sum().backward()
    assert torch.equal(factor.grad, tokens.sum(1))
    assert base.grad is None and tokens.grad is None


def test_a_dit_block_trains_bitwise_as_with_torchs_addcmul(monkeypatch):
    import core.models

    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(4, 9, 48, generator=g), torch.randn(4, 48, generator=g)
    grads = []
    for fn in (token_addcmul, torch_addcmul):
        monkeypatch.setattr(core.models, "token_addcmul", fn)
        torch.manual_seed(0)
        block = DiTBlock(48, 4)
        for p in block.adaLN_modulation.parameters():  # adaLN-Zero starts at 0: give the gates something to do
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(4))
        xi = x.clone().requires_grad_()
        block(xi, c).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in block.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_compiled_it_is_torchs_addcmul():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(5)
    operands = with_grads(torch.randn(N, D, generator=g), torch.randn(N, D, generator=g),
                          torch.randn(N, T, D, generator=g))
    y = torch.compile(token_addcmul, backend=capture, fullgraph=True)(*operands)
    targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert torch.addcmul in targets and not any("TokenAddcmul" in str(t) for t in targets)
    assert torch.equal(y, torch_addcmul(*operands))
