"""core.gelu: the reference's tanh GELU in its CPU sigmoid forms, eager and compiled, against aten's in float64."""
import pytest
import torch
import torch.nn.functional as F

from core.gelu import SigmoidFormGELU, approx_gelu

# Dense over the range activations take, plus the far tails, where σ(2u) saturates and x³ grows large.
POINTS = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([-1e4, 1e4, -1e12, 1e12, 0.0])])


def reference_values_and_gradients(x):
    """aten's tanh GELU and its derivative, in float64."""
    x64 = x.detach().double().requires_grad_()
    y = F.gelu(x64, approximate="tanh")
    (grad,) = torch.autograd.grad(y.sum(), x64)
    return y, grad


def test_eager_cpu_gelu_is_the_sigmoid_form_with_the_same_values_and_gradients():
    x = torch.cat([POINTS, torch.tensor([-3e13, 3e13])]).requires_grad_()  # and where x³ overflows fp32
    y = approx_gelu(x)
    assert type(y.grad_fn).__name__ == "SigmoidFormGELUBackward"
    (grad,) = torch.autograd.grad(y.sum(), x)
    want_y, want_grad = reference_values_and_gradients(x)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad).all()
    assert grad[-7:].tolist() == [0.0, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0]  # the saturated tails, the slope at 0


def test_the_sigmoid_form_backward_is_the_derivative_of_its_forward():
    x = torch.linspace(-6, 6, 97, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SigmoidFormGELU.apply, (x,))


def test_the_sigmoid_form_in_a_reduced_precision_or_without_gradients():
    x = POINTS[:-4].clone()
    with torch.no_grad():
        y = approx_gelu(x)
    torch.testing.assert_close(y.double(), reference_values_and_gradients(x)[0], rtol=1e-6, atol=1e-6)
    bf16 = x.bfloat16()
    assert torch.equal(approx_gelu(bf16), F.gelu(bf16, approximate="tanh"))  # aten's kernel for other dtypes


def test_compiled_gelu_is_the_sigmoid_form_with_the_same_values_and_gradients():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = POINTS[:-2].clone().requires_grad_()  # inductor's x·x·x overflows past 1e12, as aten's kernel would
    compiled = torch.compile(approx_gelu, backend=capture, fullgraph=True)(x)
    targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert torch.sigmoid in targets and F.gelu not in targets
    (grad_compiled,) = torch.autograd.grad(compiled.sum(), x)
    want_y, want_grad = reference_values_and_gradients(x)
    torch.testing.assert_close(compiled.double(), want_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_compiled.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_a_second_derivative_through_the_sigmoid_form_is_refused_by_name():
    # Its backward's passes write in place (out=): differentiated again it raised sigmoid_backward's "out=... arguments
    # don't support automatic differentiation", which names neither the GELU nor the cause.
    x = torch.linspace(-3, 3, 7, requires_grad=True)
    (grad,) = torch.autograd.grad(SigmoidFormGELU.apply(x).square().sum(), x, create_graph=True)  # a penalty's
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad.square().sum().backward()
