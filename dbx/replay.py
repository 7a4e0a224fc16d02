"""Replay a run's batch-size decisions from the MLflow store alone, to check them.

Everything a policy is given is in the store: the spec's params (the policy's own, ``epochs``,
the seed), the derived params the runner logs (``dbx.train_size``, the n of DiveBatch's
``delta * n * diversity``, and ``dbx.world_size``), and per epoch the metrics an ``EpochState``
is made of, with the estimate of each measuring epoch (``diversity``, ``diversity_samples``,
``sum_sq_norms``, ``sq_norm_of_sum``, ``estimator_seconds``, per-layer ``diversity/...``).

    from dbx.replay import replay_decisions
    for epoch, logged, replayed in replay_decisions("sqlite:///mlflow.db", run_id):
        assert logged == replayed

A fresh policy is built exactly as the run built it and fed the recorded epochs in order, so a
policy with state replays too. A run logged before dbx recorded its train size cannot be replayed
(UserError).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbx.errors import UserError


@dataclass
class Decision:
    epoch: int
    logged: int | None  # the batch size the run used in the next epoch (None after the last)
    replayed: int

    def __iter__(self) -> Any:
        return iter((self.epoch, self.logged, self.replayed))


def epoch_inputs(client: Any, run: Any) -> list[tuple[Any, Any]]:
    """Per epoch, the ``EpochState`` and the ``DiversityEstimate`` (None in epochs that did not
    measure) the run's policy was given, rebuilt from the store."""
    from dbx.protocols import DiversityEstimate, EpochState

    params, run_id = run.data.params, run.info.run_id
    if "dbx.train_size" not in params:
        raise UserError(f"run {run_id} did not log its training-set size (dbx.train_size): it is older than "
                        f"this dbx, and its decisions cannot be replayed from the store")
    keys = [k for k in run.data.metrics if not k.startswith("system/")]
    history = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}
    epochs = sorted(history.get("batch_size", {}))
    inputs = []
    for epoch in epochs:
        def value(key: str, default: Any = None, epoch: int = epoch) -> Any:
            return history.get(key, {}).get(epoch, default)

        state = EpochState(epoch=epoch, epochs=int(params["epochs"]), step=int(value("optimizer_steps", 0)),
                           batch_size=int(value("batch_size")), lr=value("lr"), samples_seen=int(value("samples_seen", 0)),
                           dataset_size=int(params["dbx.train_size"]), train_loss=value("train_loss"),
                           test_loss=value("test_loss"), train_accuracy=value("train_accuracy"),
                           test_accuracy=value("test_accuracy"))
        estimate = None
        if value("diversity") is not None:
            per_layer = {k[len("diversity/"):]: v[epoch] for k, v in history.items()
                         if k.startswith("diversity/") and epoch in v}
            estimate = DiversityEstimate(value=value("diversity"), samples=int(value("diversity_samples", 0)),
                                         seconds=value("estimator_seconds", 0.0), per_layer=per_layer,
                                         sum_sq_norms=value("sum_sq_norms"), sq_norm_of_sum=value("sq_norm_of_sum"))
        inputs.append((state, estimate))
    return inputs


def replay_decisions(uri: str, run_id: str) -> list[Decision]:
    """The policy's decision after each epoch, replayed, beside the batch size the run then used."""
    import yaml

    from dbx import registry, tracking

    client = tracking._client(uri)
    run = tracking.find_run(uri, run_id)
    params = run.data.params
    prefix = "policy.params."
    policy_params: dict[str, Any] = {}
    for key, text in params.items():
        if key.startswith(prefix):
            *parents, last = key[len(prefix):].split(".")
            target = policy_params
            for name in parents:
                target = target.setdefault(name, {})
            target[last] = yaml.safe_load(text)
    policy = registry.build("policy", params["policy.name"], policy_params,
                            dataset_size=int(params.get("dbx.train_size", 0)), seed=int(params.get("seed", 0)))
    inputs = epoch_inputs(client, run)
    decisions = []
    for index, (state, estimate) in enumerate(inputs):
        replayed = policy.next_batch_size(state, estimate)
        logged = inputs[index + 1][0].batch_size if index + 1 < len(inputs) else None
        decisions.append(Decision(state.epoch, logged, replayed))
    return decisions
