"""Shared test fixtures: the reference DiT's weights and outputs."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# A verbatim copy of shared/fixtures (reference DiT outputs), kept in the repo so a clean clone tests.
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Test trials run a few steps and report nearly every one; each report waits for Ray Train's next
# health check, so studies launched by the tests (in this process or as subprocesses, which inherit
# the environment) check every 0.1 s instead of scaling.run's 1 s, which spares CPU in real runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


@pytest.fixture(scope="session")
def reference():
    """(model config, reference weights, reference tensors) of dit_reference_tiny."""
    meta = json.loads((FIXTURES / "dit_reference_tiny.json").read_text())
    tensors = load_file(str(FIXTURES / "dit_reference_tiny.safetensors"))
    weights = {k: v for k, v in tensors.items() if not k.startswith("fixture.")}
    outputs = {k[len("fixture."):]: v for k, v in tensors.items() if k.startswith("fixture.")}
    return meta, weights, outputs


@pytest.fixture
def reference_model(reference):
    """The reference tiny DiT in eval mode, loaded with strict key matching."""
    from core.models import DiT

    meta, weights, _ = reference
    model = DiT(**meta["model"])
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
