"""core.flops: Table 4 of the paper, exact parameter counts, and FlopCounterMode agreement."""
import pytest
import torch

from core.flops import gflops, measure_gflops, params, train_flop_per_image, training_compute
from core.models import DiT_models

TABLE_4_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
KNOWN_OFF = {"DiT-L/2": 0.013, "DiT-XL/4": 0.0065, "DiT-XL/2": 0.019}  # the measured distance, rounded up
PARAMS = {"DiT-XL/2": 675_129_632, "DiT-L/2": 458_102_816, "DiT-B/2": 130_512_416, "DiT-S/2": 32_963_360}


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return DiT_models[name](**kwargs)


@pytest.mark.parametrize("name", TABLE_4_GFLOPS)
def test_table_4_gflops(name):
    g = gflops(meta_model(name))
    # Within the table's rounding to 0.01 (S/8: 0.358 prints as 0.36), but for the three the README names as off by
    # 0.01 or 0.02 (its fourth, B/4's 5.5652, rounds to 5.57 yet lies within this): a relative tolerance would let
    # XL/2 lose its blocks' adaLN products (0.22) unnoticed, and 0.02 for all would let DiT-S/8 lose its (0.011).
    assert abs(g - TABLE_4_GFLOPS[name]) <= KNOWN_OFF.get(name, 0.0055)


@pytest.mark.parametrize("name", PARAMS)
def test_exact_parameter_counts(name):
    assert params(meta_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name, kwargs", [
    ("DiT-XL/2", {}), ("DiT-S/8", {}), ("DiT-B/4", dict(input_size=64)), ("DiT-P/1", {}), ("DiT-M/2", {}),
    ("DiT-T/4", dict(learn_sigma=False)), ("DiT-N/2", dict(mlp_ratio=2.0, in_channels=3)),
])
def test_analytic_gflops_equal_flop_counter(name, kwargs):
    model = meta_model(name, **kwargs)
    assert measure_gflops(model) == pytest.approx(gflops(model), rel=1e-9)


def test_flop_counter_on_a_real_cpu_model():
    model = DiT_models["DiT-P/2"]()
    assert measure_gflops(model) == pytest.approx(gflops(model), rel=1e-9)


def test_gflops_scale_with_patch_and_size():
    # Halving the patch quadruples the tokens: Gflops grow ~4× (a little more through attention).
    ratio = gflops(meta_model("DiT-XL/2")) / gflops(meta_model("DiT-XL/4"))
    assert 4.0 < ratio < 4.2


def test_training_compute():
    assert training_compute(118.64, 256, 400_000) == pytest.approx(118.64 * 256 * 400_000 * 3)
    assert train_flop_per_image(1.0) == pytest.approx(6e9)
