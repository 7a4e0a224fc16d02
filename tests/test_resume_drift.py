"""Resume never drifts silently: a policy that forgets part of its state in ``state_dict`` fails
``dbx.testing.check_policy`` with the first epoch where a restored copy decides differently, and
``dbx resume`` of a real run with such a policy warns, naming the policy and what differs.

The policy of these tests doubles the batch size after ``patience`` epochs at one size, and
counts those epochs in ``waited``: the field a real plugin forgot.
"""
import pytest
from click.testing import CliRunner
from distributions import install

from dbx import registry
from dbx.cli import main
from dbx.testing import ContractError, check_estimator, check_model, check_policy

PATIENT = '''
from typing import Any


class Patient:
    """Double the batch after `patience` epochs at the same size, up to `max`."""

    uses_diversity = False

    def __init__(self, *, initial: int = 8, patience: int = 2, max: int = 64) -> None:
        self.initial, self.patience, self.max = initial, patience, max
        self.waited = 0

    def initial_batch_size(self) -> int:
        return self.initial

    def measures_in(self, epoch: int) -> bool:
        return False

    def next_batch_size(self, state, diversity) -> int:
        self.waited += 1
        if self.waited >= self.patience and state.batch_size < self.max:
            self.waited = 0
            return min(2 * state.batch_size, self.max)
        return state.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.waited = state["waited"]


class ForgetsTheCounter(Patient):
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class IgnoresTheCounterOnLoad(Patient):
    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
'''


@pytest.fixture
def patient(site):
    install(site, "patient-policies", """\
        [dbx.policies]
        patient = patient_mod:Patient
        forgetful = patient_mod:ForgetsTheCounter
        deaf = patient_mod:IgnoresTheCounterOnLoad
        """, {"patient_mod": PATIENT})
    registry.refresh()
    import patient_mod

    return patient_mod


def test_check_policy_passes_the_policy_that_keeps_its_counter(patient):
    sizes = check_policy(patient.Patient, dataset_size=1000, epochs=12)
    assert sizes["varied"] == [8, 8, 16, 16, 32, 32, 64, 64, 64, 64, 64, 64]


def test_check_policy_names_the_first_epoch_where_a_restored_policy_decides_otherwise(patient):
    with pytest.raises(ContractError) as info:
        check_policy(patient.ForgetsTheCounter, dataset_size=1000, epochs=12)
    text = "\n".join(info.value.problems)
    assert ("restored from state_dict() after every epoch, it chose batch size 8 after epoch 2 where the "
            "uninterrupted policy chose 16 (epochs 1-1 agreed)") in text
    assert "a resumed run drifts from an uninterrupted one" in text


def test_check_policy_catches_a_load_state_dict_that_restores_less_than_was_saved(patient):
    with pytest.raises(ContractError) as info:
        check_policy(patient.IgnoresTheCounterOnLoad, dataset_size=1000, epochs=12)
    assert ("after epoch 1: after load_state_dict(state), state_dict() is not the state given "
            "(waited: saved 1, now 0)") in "\n".join(info.value.problems)


def test_check_policy_refuses_a_state_that_a_checkpoint_cannot_hold(patient):
    class KeepsAnObject(patient.Patient):
        def state_dict(self):
            return {"waited": self.waited, "when": object()}

    with pytest.raises(ContractError, match=r"state\['when'\] is a object; save plain Python values only"):
        check_policy(KeepsAnObject, dataset_size=1000, epochs=4)


def test_check_estimator_restores_the_state_between_measuring_epochs():
    from dbx.estimators.subsampled import SubsampledEstimator

    class ForgetsItsDraws(SubsampledEstimator):
        def load_state_dict(self, state):
            pass

    check_estimator(SubsampledEstimator)
    with pytest.raises(ContractError, match=r"after load_state_dict\(state\), state_dict\(\) is not the state given "
                                            r"\(draws: saved 1, now 0\)"):
        check_estimator(ForgetsItsDraws)


def test_check_model_finds_a_model_whose_weights_do_not_survive_a_checkpoint():
    import torch

    class Scaled(torch.nn.Module):
        """Keeps its scale in a plain attribute, which the checkpoint does not hold."""

        def __init__(self, *, num_classes, input_shape):
            super().__init__()
            self.linear = torch.nn.Linear(input_shape[0], num_classes or 1)
            self.scale = float(torch.rand(()))

        def forward(self, x):
            return self.linear(x.flatten(1)) * self.scale

    def scaled(*, num_classes: int | None, input_shape: tuple[int, ...]) -> torch.nn.Module:
        return Scaled(num_classes=num_classes, input_shape=input_shape)

    with pytest.raises(ContractError, match="a model restored from the checkpoint of another computes other outputs"):
        check_model(scaled, input_shape=(4,), regression=False)


SPEC = """\
name: drift
device: cpu
data: {name: synthetic_logistic, params: {n: 200, d: 4}}
model: {name: logreg}
optimizer: {lr: 0.1}
epochs: 5
policy: {name: POLICY}
checkpoint: {keep_last: 10}
tracking: {system_metrics: false}
"""


def resume_from_epoch_4(tmp_path, policy):
    """Run 5 epochs, drop the last checkpoint (as if killed in epoch 5), resume: the output and the run."""
    from mlflow import MlflowClient

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("POLICY", policy))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri])
    assert first.exit_code == 0, first.output
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (tmp_path / "dbx-checkpoints" / run.info.run_id / "epoch-0005.ckpt").unlink()
    resumed = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", uri])
    assert resumed.exit_code == 0, resumed.output
    return resumed.output, client.get_run(run.info.run_id)


def test_resume_warns_when_the_restored_policy_would_decide_otherwise(patient, tmp_path):
    output, run = resume_from_epoch_4(tmp_path, "forgetful")
    warning = ("WARNING: policy 'forgetful': restored from its saved state, it decides batch size 16 after epoch 4, "
               "where the run decided 32 from the same inputs")
    assert warning in output
    assert "dbx.testing.check_policy finds the epoch" in output
    assert run.data.tags["dbx.resume.warning"].startswith("policy 'forgetful': restored from its saved state")


def test_resume_of_a_policy_that_keeps_its_state_is_silent(patient, tmp_path):
    output, run = resume_from_epoch_4(tmp_path, "patient")
    assert "WARNING" not in output
    assert "dbx.resume.warning" not in run.data.tags
    assert "resuming run" in output and "after epoch 4" in output


def test_resume_warns_about_a_state_that_load_state_dict_does_not_restore(patient, tmp_path):
    """Resumed after epoch 3 (waited = 1 then): the restored 'deaf' policy reports waited 0."""
    from mlflow import MlflowClient

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("POLICY", "deaf"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri]).exit_code == 0
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    for epoch in (4, 5):
        (tmp_path / "dbx-checkpoints" / run.info.run_id / f"epoch-000{epoch}.ckpt").unlink()
    result = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert ("WARNING: policy 'deaf': right after load_state_dict(saved state), state_dict() differs from the saved "
            "state (waited: saved 1, now 0)") in result.output
