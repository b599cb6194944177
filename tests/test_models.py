"""core.models against the reference DiT: weights, forward, guidance, registry, shapes."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.models import (SHORT_SEQUENCE, DiT, DiT_models, attention, get_2d_sincos_pos_embed, load_reference_state_dict,
                         meta_dit, model_config)


def test_reference_forward(reference, reference_model):
    _, _, ref = reference
    with torch.no_grad():
        out = reference_model(ref["x"], ref["t"], ref["y"])
    assert out.shape == ref["out"].shape
    assert (out - ref["out"]).abs().max() < 1e-5


def test_reference_guided_forward_first_three_channels(reference, reference_model):
    meta, _, ref = reference
    with torch.no_grad():
        out = reference_model.forward_with_cfg(ref["cfg_x"], ref["cfg_t"], ref["cfg_y"], meta["cfg_scale"])
    assert (out - ref["cfg_out"]).abs().max() < 1e-5


def test_compiled_model_reproduces_the_reference_forward(reference, reference_model):
    """torch.compile (inductor, with the sigmoid form of the GELU) gives the reference's outputs too."""
    _, _, ref = reference
    with torch.no_grad():
        out = torch.compile(reference_model)(ref["x"], ref["t"], ref["y"])
    assert (out - ref["out"]).abs().max() < 1e-5


def test_guiding_every_channel_differs_only_in_channel_three(reference, reference_model):
    meta, _, ref = reference
    with torch.no_grad():
        paper = reference_model.forward_with_cfg(ref["cfg_x"], ref["cfg_t"], ref["cfg_y"], meta["cfg_scale"])
        full = reference_model.forward_with_cfg(ref["cfg_x"], ref["cfg_t"], ref["cfg_y"], meta["cfg_scale"],
                                                guided_channels=None)
    assert torch.equal(full[:, :3], paper[:, :3])
    assert torch.equal(full[:, 4:], paper[:, 4:])
    assert not torch.allclose(full[:, 3], paper[:, 3])
    # Both halves of a guided batch carry the same guided prediction.
    assert torch.equal(full[:3, :4], full[3:, :4])


def guided_batch():
    """A DiT-P/2 with outputs to guide, and a guided batch for it: two images, conditional, then null (class 10)."""
    from core.models import DiT, model_config

    torch.manual_seed(0)
    model = DiT(**model_config("DiT-P/2")).eval()
    for p in model.parameters():  # adaLN-Zero starts every output at 0: give the outputs something to guide
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 1, 8, 8).repeat(2, 1, 1, 1)
    return model, x, torch.tensor([500] * 4), torch.tensor([3, 7, 10, 10])


def test_guidance_never_reaches_the_variance_channels_of_a_model_with_fewer_noise_channels():
    # The default guided_channels=3 is the paper's, for 4 latent channels; a 1-channel model (the digits)
    # has its variance in channel 1, which guidance must leave as the model predicted it.
    model, x, t, y = guided_batch()
    with torch.no_grad():
        plain = model(x, t, y)
        guided = model.forward_with_cfg(x, t, y, 4.0)
    assert torch.equal(guided[:, 1], plain[:, 1])  # the variance channel of each half, unguided
    expected = plain[2:, 0] + 4.0 * (plain[:2, 0] - plain[2:, 0])
    torch.testing.assert_close(guided[:2, 0], expected)


def test_positional_embedding_matches_reference(reference):
    meta, weights, _ = reference
    d = meta["model"]["hidden_size"]
    grid = meta["model"]["input_size"] // meta["model"]["patch_size"]
    ours = torch.from_numpy(get_2d_sincos_pos_embed(d, grid)).float()
    assert (ours - weights["pos_embed"][0]).abs().max() < 1e-6


def test_fresh_model_is_adaln_zero(reference):
    meta, _, ref = reference
    model = DiT(**meta["model"]).eval()
    names = set(model.state_dict())
    assert names == set(reference[1]), "state dict names must be the reference's"
    assert not model.pos_embed.requires_grad
    # Zero-initialised modulation and output layer: the untrained model predicts exactly zero.
    with torch.no_grad():
        assert torch.count_nonzero(model(ref["x"], ref["t"], ref["y"])) == 0


def test_label_dropout_only_in_training(reference):
    meta, _, _ = reference
    model = DiT(**meta["model"])
    labels = torch.zeros(10_000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = model.y_embedder.token_drop(labels)
    assert abs((dropped == meta["model"]["num_classes"]).float().mean().item() - 0.1) < 0.01
    e_eval = model.y_embedder(labels[:8], train=False)
    assert torch.equal(e_eval, model.y_embedder.embedding_table.weight[labels[:8]])


def test_paper_registry():
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, (depth, width, heads) in expected.items():
        for patch in (2, 4, 8):
            cfg = model_config(f"DiT-{size}/{patch}")
            assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"]) == (depth, width, heads, patch)
            assert (cfg["input_size"], cfg["in_channels"], cfg["num_classes"]) == (32, 4, 1000)


def test_small_presets_fit_the_issue_ladder():
    small = [n for n in DiT_models if n.split("-")[1].split("/")[0] in "PNTM"]
    assert len(small) >= 9
    for name in small:
        cfg = model_config(name)
        assert 64 <= cfg["hidden_size"] <= 256 and 2 <= cfg["depth"] <= 8
        assert cfg["input_size"] % cfg["patch_size"] == 0 and cfg["hidden_size"] % cfg["num_heads"] == 0


def test_registry_overrides_and_output_shape():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=64)
    assert model.x_embedder.num_patches == 32 * 32
    small = DiT_models["DiT-P/2"](learn_sigma=False)
    out = small(torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 999]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=32, patch_size=3), "patch_size 3 does not divide input_size 32"),
    (dict(hidden_size=100, num_heads=16), "num_heads 16 does not divide hidden_size 100"),
    (dict(depth=0), "depth must be a positive integer"),
])
def test_impossible_shapes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiT(**{**dict(hidden_size=64, num_heads=4, depth=1), **kwargs})


def test_unknown_model_name():
    with pytest.raises(KeyError, match="unknown model 'DiT-Q/2'"):
        model_config("DiT-Q/2")


def test_load_reference_checkpoint_formats(tmp_path, reference):
    meta, weights, ref = reference
    pt = tmp_path / "train.pt"
    # The reference train.py saves its parsed arguments, an argparse.Namespace.
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, epochs=1400, global_seed=0)
    torch.save({"model": weights, "ema": weights, "opt": {}, "args": args}, pt)
    model = DiT(**meta["model"])
    model.load_state_dict(load_reference_state_dict(pt), strict=True)
    with torch.no_grad():
        assert (model.eval()(ref["x"], ref["t"], ref["y"]) - ref["out"]).abs().max() < 1e-5
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.pt"):
        load_reference_state_dict(truncated)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_reference_state_dict(tmp_path / "missing.pt")


def test_load_reference_checkpoint_prefers_ema_then_model_and_names_a_file_without_weights(tmp_path, reference):
    _, weights, _ = reference
    scaled = {k: v * 2 for k, v in weights.items()}
    both, model_only = tmp_path / "both.pt", tmp_path / "model_only.pt"
    torch.save({"model": scaled, "ema": weights, "args": argparse.Namespace(lr=1e-4)}, both)
    torch.save({"model": scaled, "opt": {}, "args": argparse.Namespace(lr=1e-4)}, model_only)
    assert all(torch.equal(v, weights[k]) for k, v in load_reference_state_dict(both).items())
    loaded = load_reference_state_dict(model_only)
    assert loaded.keys() == scaled.keys() and all(torch.equal(v, scaled[k]) for k, v in loaded.items())
    for name, content in (("list.pt", [weights]), ("opt_only.pt", {"opt": {}, "args": None}),
                          ("nested.pt", {"ema": {"blocks": weights}})):
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=rf"^DiT checkpoint .*{name} holds no state dict"):
            load_reference_state_dict(tmp_path / name)
    # Still weights only: an arbitrary class (here a Path) is refused, not unpickled.
    torch.save({"ema": weights, "args": tmp_path}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="cannot read DiT checkpoint .*foreign.pt"):
        load_reference_state_dict(tmp_path / "foreign.pt")


@pytest.mark.parametrize("shape", [(1, 1, 4, 16), (1, 1, 16, 4), (2, 2, 8, 8), (1, 1, 6, 6), (1, 1, 8, 7), (1, 8, 8)])
def test_an_input_of_the_wrong_shape_is_named(shape):
    # (1, 1, 4, 16) has the 16 tokens of an 8×8 image at patch 2, and came back as a scrambled 8×8 output.
    model = DiT(**model_config("DiT-P/2")).eval()
    t, y = torch.zeros(shape[0], dtype=torch.long), torch.zeros(shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match=rf"^x must be \(N, 1, 8, 8\), got {re.escape(str(shape))}$"):
        model(torch.randn(shape), t, y)
    with pytest.raises(ValueError, match=r"^x must be \(N, 1, 8, 8\)"):
        model.forward_with_cfg(torch.randn(shape).repeat(2, *[1] * (len(shape) - 1)), t.repeat(2), y.repeat(2), 4.0)
    labels = torch.zeros(3, dtype=torch.long)
    assert model(torch.randn(3, 1, 8, 8), labels, labels).shape == (3, 2, 8, 8)
    with torch.device("meta"):  # the check reads static sizes only: shapes traced on the meta device pass
        labels = torch.zeros(3, dtype=torch.long)
        assert DiT(**model_config("DiT-P/2"))(torch.zeros(3, 1, 8, 8), labels, labels).shape == (3, 2, 8, 8)


def test_guidance_under_bf16_autocast_is_combined_in_fp32():
    # uncond + s·(cond - uncond) in bf16 rounds to 8 bits of mantissa and s multiplies the error: the reference samples
    # in fp32, so the guided output is combined (and returned) in fp32 from the bf16 model outputs.
    model, x, t, y = guided_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x, t, y)
        guided = model.forward_with_cfg(x, t, y, 4.0)
    assert plain.dtype == torch.bfloat16 and guided.dtype == torch.float32
    cond, uncond = plain[:2, 0].float(), plain[2:, 0].float()
    assert torch.equal(guided[:2, 0], uncond + 4.0 * (cond - uncond))
    assert torch.equal(guided[:, 1], plain[:, 1].float())  # the variance channel, unguided
    with torch.no_grad():  # a float64 model's stays float64 (made fp32, it lost its precision)
        assert model.double().forward_with_cfg(x.double(), t, y, 4.0).dtype == torch.float64


def test_an_empty_batch_trains_on_the_onednn_path(monkeypatch):
    # On AVX-512 CPUs that are not Intel's, linears run on oneDNN, whose backward cannot multiply an empty batch
    # (an empty micro-batch): such a batch is left to F.linear. Forced here, as core.linear's tests do.
    import core.linear

    if core.linear._onednn_matmul is None:
        pytest.skip("this torch is built without oneDNN")
    monkeypatch.setattr(core.linear, "ONEDNN_PREFERRED", True)
    torch.manual_seed(0)
    layer = core.linear.Linear(8, 4)
    x = torch.randn(0, 3, 8, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == (0, 3, 4) and x.grad.shape == (0, 3, 8)
    assert torch.equal(layer.weight.grad, torch.zeros(4, 8)) and torch.equal(layer.bias.grad, torch.zeros(4))
    model = DiT(**model_config("DiT-P/2")).train()
    empty = torch.zeros(0, dtype=torch.long)
    model(torch.randn(0, 1, 8, 8), empty, empty).square().mean().nan_to_num().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    # A non-empty batch still takes oneDNN.
    calls = []
    monkeypatch.setattr(core.linear._OneDNNLinear, "apply", lambda *a: calls.append(1) or F.linear(*a))
    layer(torch.randn(2, 8))
    assert calls == [1]


def test_gradient_checkpointing_gives_the_same_gradients(reference):
    meta, weights, ref = reference
    grads = []
    for ckpt in (False, True):
        model = DiT(**meta["model"])
        model.load_state_dict(weights)
        model.gradient_checkpointing = ckpt
        model.train()
        torch.manual_seed(1)
        model(ref["x"], ref["t"], ref["y"]).square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("tokens", [4, 16, 64])
def test_attention_matches_torchs_fused_kernel(tokens):
    # Up to SHORT_SEQUENCE tokens on CPU the products are written out (core.short_attention); beyond, torch's kernel.
    torch.manual_seed(0)
    heads, head_dim = 2, 8
    qkv = torch.randn(3, tokens, 3 * heads * head_dim, dtype=torch.float64, requires_grad=True)  # (N, T, 3·D)
    ours = attention(qkv, heads)
    (grad,) = torch.autograd.grad(ours.square().sum(), qkv)
    q, k, v = qkv.reshape(3, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # timm's split
    fused = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, tokens, heads * head_dim)
    (fused_grad,) = torch.autograd.grad(fused.square().sum(), qkv)
    assert ours.shape == (3, tokens, heads * head_dim)
    if tokens > SHORT_SEQUENCE:
        assert torch.equal(ours, fused)
    torch.testing.assert_close(ours, fused, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, fused_grad, rtol=1e-10, atol=1e-12)


def test_a_position_table_past_a_gib_is_refused_before_it_is_computed():
    # A study of 8192-pixel images checked DiT-XL/2's shape by building it on the meta device, whose sin-cos table
    # numpy still computed: tens of GiB, and the check died out of memory instead of naming the size.
    from core.models import MAX_POSITION_ENTRIES, check_shape

    check_shape(64, 2, 1152, 16, 28, 4.0)  # DiT-XL/2 at 512×512: 1,024 tokens
    with pytest.raises(ValueError, match=r"^input_size 1024 at patch_size 2 makes 262,144 tokens, whose positions at "
                                         r"hidden_size 1152 are past 268,435,456 entries, the most a DiT here may have$"):
        check_shape(1024, 2, 1152, 16, 28, 4.0)
    with pytest.raises(ValueError, match="makes 262,144 tokens"):
        DiT(input_size=1024, patch_size=2, hidden_size=1152, num_heads=16, depth=1)
    assert MAX_POSITION_ENTRIES >= 4096 * 65536  # a 64×64 token grid at the widest hidden size


def test_a_dit_on_the_meta_device_has_the_shapes_of_one_built_in_memory_and_imports_no_compiler():
    # A study's check builds each trial's model on the meta device for its parameter count: torch's meta normal_
    # imported torch._dynamo there, a CPU-second or two in every driver and dry run.
    built = DiT(**model_config("DiT-P/2"))
    meta = meta_dit(**model_config("DiT-P/2"))
    assert all(p.is_meta for p in meta.parameters())
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in built.named_parameters()]
    # Alone in a fresh process: DiT-XL/2's 675M parameters, no memory, no compiler.
    code = ("import sys; from core.models import meta_dit, model_config; from core.flops import params; "
            "m = meta_dit(**model_config('DiT-XL/2')); print(params(m), 'torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["675129632", "False"]  # the paper's 675M
