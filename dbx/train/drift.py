"""A resumed run must not drift silently from the run it continues.

A policy whose ``state_dict`` misses a field (a patience counter, a smoothed value) resumes with
that field reset, and from then on may choose other batch sizes than the uninterrupted run would,
with no error anywhere. ``dbx.testing.check_policy`` catches this in a plugin's own tests; this
module is the check at run time, from what the checkpoint holds:

- ``RecordedPolicy`` wraps the run's policy and remembers its last decision: the state it
  decided from, the ``EpochState`` and estimate it was given and the batch size it chose. The
  checkpoint saves that record beside the policy's state.
- ``resume_warnings`` (called by ``dbx resume`` after the checkpoint is loaded) replays that
  decision on a policy built afresh from the saved state, and compares the saved states of the
  policy and the estimator with what ``state_dict()`` gives right after ``load_state_dict``.
  Each disagreement is one warning naming the plugin and what differs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dbx.plugin_state import decode_state, encode_state, state_differences
from dbx.protocols import DiversityEstimate, EpochState

__all__ = ["RecordedPolicy", "resume_warnings"]


class RecordedPolicy:
    """The run's policy, unchanged in behaviour, remembering its last ``next_batch_size`` call.

    Everything but ``next_batch_size`` is passed through to the policy (so ``hasattr`` for the
    optional ``metrics`` and ``lr_factor`` answers as it would for the policy itself). The cost is
    one ``state_dict()`` per epoch.
    """

    def __init__(self, policy: Any, name: str) -> None:
        self.policy = policy
        self.name = name
        self.last_decision: dict[str, Any] | None = None

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int:
        try:
            before = encode_state(self.policy.state_dict(), owner=f"policy {self.name!r}")
        except TypeError:  # the checkpoint then fails with this message, at the right epoch
            before = None
        answer = self.policy.next_batch_size(state, diversity)
        if before is None:
            self.last_decision = None
            return answer
        self.last_decision = {
            "policy_state": before,
            "epoch_state": dataclasses.asdict(state),
            "diversity": None if diversity is None else dataclasses.asdict(diversity),
            "batch_size": answer,
        }
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)


def resume_warnings(payload: dict[str, Any], *, policy: Any, estimator: Any, policy_name: str,
                    estimator_name: str, build_policy: Callable[[], Any]) -> list[str]:
    """What the loaded checkpoint says that the restored plugins contradict (empty when nothing).

    ``policy`` and ``estimator`` have had ``load_state_dict`` called with the saved states;
    ``build_policy()`` makes another policy as the run did, for the replay.
    """
    warnings = []
    after_load = _reloaded(payload.get("policy"), policy, f"policy {policy_name!r}")
    if after_load:
        warnings.append(after_load)
    if payload.get("estimator") is not None and hasattr(estimator, "state_dict"):
        after_load = _reloaded(payload["estimator"], estimator, f"estimator {estimator_name!r}")
        if after_load:
            warnings.append(after_load)
    if payload.get("decision"):
        try:
            replayed = _replay(decode_state(payload["decision"]), build_policy, policy_name, payload.get("policy"))
        except Exception as exc:  # noqa: BLE001 - a policy that cannot replay its own decision is the finding
            replayed = (f"policy {policy_name!r}: replaying its last decision from the saved state raised "
                        f"{type(exc).__name__}: {exc}; this resumed run may drift from an uninterrupted one")
        if replayed:
            warnings.append(replayed)
    return warnings


def _reloaded(saved: Any, plugin: Any, who: str) -> str | None:
    if not isinstance(saved, str):
        return None  # format 1 kept no canonical text to compare with
    now = encode_state(plugin.state_dict(), owner=who)
    if now == saved:
        return None
    return (f"{who}: right after load_state_dict(saved state), state_dict() differs from the saved state "
            f"({state_differences(saved, now)}); load_state_dict does not restore everything state_dict saves, "
            f"so this run may not continue as the uninterrupted run would")


def _replay(decision: dict[str, Any], build_policy: Callable[[], Any], name: str, saved_after: Any) -> str | None:
    epoch_state = EpochState(**decision["epoch_state"])
    diversity = None if decision["diversity"] is None else DiversityEstimate(**decision["diversity"])
    fresh = build_policy()
    fresh.load_state_dict(decode_state(decision["policy_state"]))
    answer = fresh.next_batch_size(epoch_state, diversity)
    epoch = epoch_state.epoch
    if answer != decision["batch_size"]:
        return (f"policy {name!r}: restored from its saved state, it decides batch size {answer} after epoch {epoch}, "
                f"where the run decided {decision['batch_size']} from the same inputs: its state_dict() misses "
                f"something next_batch_size depends on, so this resumed run will likely choose other batch sizes "
                f"than an uninterrupted one (dbx.testing.check_policy finds the epoch)")
    if isinstance(saved_after, str):
        now = encode_state(fresh.state_dict(), owner=f"policy {name!r}")
        if now != saved_after:
            return (f"policy {name!r}: replaying epoch {epoch}'s decision from the saved state ends in another state "
                    f"than the run saved ({state_differences(saved_after, now)}); its state_dict() misses "
                    f"something, so this resumed run may drift from an uninterrupted one")
    return None
