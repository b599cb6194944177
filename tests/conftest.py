"""Shared test fixtures: the reference DiT's weights and outputs; each test's own Ray temp dir."""
import json
import os
import shutil
import tempfile
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
# No usage reports from the tests' MLflow and Ray (no network here), before a test module imports MLflow, whose
# telemetry thread starts at import; also for the subprocesses, which inherit the environment.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


# The longest tests, longest first (make test's durations, 2026-12-07, the 2-core box): started first, so the short
# ones fill in around them. Begun where collection put them, the last of them ran for minutes with the other
# workers idle, nothing left to take. Under make test's --maxschedchunk 1, xdist hands out one test at a time as a
# worker frees up (its default hands each worker a run of consecutive tests: all of these to one).
LONGEST_FIRST = (
    "test_run.py::test_end_to_end_and_rerun_skips_finished",
    "test_cluster_faults.py::test_mlflow_outage_is_queued_and_replayed",
    "test_cluster_faults.py::test_node_losses_restart_the_trial_from_its_checkpoint",
    "test_run.py::test_stopped_or_killed_driver_resumes_without_duplicates",
    "test_run.py::test_steps_added_to_a_study_train_on_from_its_finished_trial",
    "test_faults.py::test_a_checkpoint_that_does_not_load_fails_its_trial_at_once_naming_what_to_delete",
    "test_data.py::test_reencoding_replaces_a_latent_folder_only_once_complete",
    "test_faults.py::test_trial_failing_after_its_retries_is_failed_and_the_study_finishes",
    "test_autoscaling.py::test_a_study_needing_a_node_the_autoscaler_adds_runs_on_it",
    "test_ray_trial.py::test_a_tune_actor_keeps_its_idle_synchronization_actor_for_its_next_run",
    "test_ray_trial.py::test_a_trial_trains_in_torchs_process_group_with_lighter_processes",
    "test_evaluate.py::test_two_gloo_processes_match_one",
    "test_train.py::test_two_gloo_processes_match_one[2]",
    "test_train.py::test_two_gloo_processes_match_one[3]",
    "test_tune_relay.py::test_a_slow_driver_gets_every_report_and_no_checkpoint_runs_ahead_of_it",
)


def pytest_collection_modifyitems(config, items):
    """The LONGEST_FIRST tests first, in its order; the others as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(f"{item.path.name}::{item.name}", len(rank)))


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


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """A new SQLite MLflow store, its tables made: a copy of it spares each test MLflow's migrations (a second)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _private_ray(monkeypatch):
    """Every test that starts Ray gets its own temp dir, not /tmp/ray: its Ray neither finds nor is
    found by another one on the machine, such as a study the developer runs meanwhile (short path:
    Ray's socket paths must fit in 107 bytes). A developer's RAY_ADDRESS or MLflow server stays out."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no network here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_process_env():
    """os.environ for a fresh process that trains on its own: without the variables of the one-process group that
    core.train, run in this session's process by another test, may have left there (the process would join it)."""
    group = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    return {k: v for k, v in os.environ.items() if k not in group}


@pytest.fixture
def encode_tiny_latents():
    """encode(folder, seed): a latent folder of 16 images (4×4×4 latents, 2 classes) written as an encode is,
    replacing what is there (each call a new encode of the folder, as scaling.encode_latents would make)."""
    from core.latents import write_latent_folder, write_shard

    def encode(folder, seed):
        generator = torch.Generator().manual_seed(seed)

        def shards(new):
            entry = write_shard(new, 0, torch.randn(16, 2, 4, 4, 4, generator=generator), [0, 1] * 8, range(16))
            return [entry], [4, 4, 4]
        write_latent_folder(folder, shards, {"num_images": 16, "classes": ["a", "b"], "image_size": 32,
                                             "scale_factor": 0.18215})
    return encode


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A file torch-fidelity's Inception-v3 loads: its own network's state dict at its random start (the real
    weights are a download, which no test makes)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with pytest.MonkeyPatch.context() as patch:  # built without weights: its loader is handed nothing to load
        patch.setattr(inception.torch, "load", lambda *args, **kwargs: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                        feature_extractor_weights_path="none")
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(network.state_dict(), path)
    return path
