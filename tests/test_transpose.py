"""core.transpose: the channel-shuffle copies are exactly x.t().contiguous(), and taken where they are faster."""
import pytest
import torch

import core.transpose
from core.transpose import transposed
from op_names import OpNames  # tests/, on pytest's path

SHUFFLE = "aten::native_channel_shuffle"


@pytest.mark.parametrize("shape, shuffles", [
    ((2048, 96), 1),  # slabs of 64 rows: DiT-N/2's block input at batch 128
    ((1024, 640), 1),  # DiT-T/2's MLP gradient at batch 64
    ((256, 160), 1),  # one pixel: DiT-T/4's tokens at batch 64
    ((160, 640), 1),  # a weight gradient laid out as its parameter
    ((64, 960), 1),  # an adaLN gradient
    ((3, 5), 1),  # odd sizes, one pixel
    ((320, 7), 1),  # slabs, an odd width
    ((300, 16), 0),  # past one pixel and not in slabs of 64: aten's copy
    ((1, 9), 0), ((9, 1), 0), ((0, 4), 0),  # nothing to shuffle
])
@pytest.mark.skipif(not core.transpose._VECTORISED, reason="torch's shuffle transposes with fbgemm on AVX2 CPUs only")
def test_transposed_is_exactly_the_transposed_copy(shape, shuffles):
    x = torch.randn(*shape)
    with OpNames() as ops:
        out = transposed(x)
    assert out.shape == shape[::-1] and out.is_contiguous()
    assert torch.equal(out, x.t().contiguous())
    assert ops.names.count(SHUFFLE) == shuffles


def test_transposed_copies_and_takes_any_layout():
    x = torch.randn(96, 1024).t()  # (1024, 96), not contiguous: aten's copy
    with OpNames() as ops:
        out = transposed(x)
    assert torch.equal(out, x.t().contiguous()) and SHUFFLE not in ops.names
    y = torch.randn(1024, 160)
    out = transposed(y)
    out[0, 0] += 1  # a copy, not a view of its input
    assert out[0, 0] != y[0, 0]
    z = torch.randn(512, 64, dtype=torch.float64)  # fbgemm transposes fp32 only: aten's copy
    with OpNames() as ops:
        assert torch.equal(transposed(z), z.t().contiguous())
    assert SHUFFLE not in ops.names
