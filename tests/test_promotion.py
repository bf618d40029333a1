"""The promotion gate: the pure decision, and the alias moves against a real MLflow SQLite registry."""

from __future__ import annotations

import pytest
from conftest import tiny_params
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from flows import promotion, scoring
from flows.promotion import Scores, decide
from lmline import config
from lmline.config import PromoteConfig
from lmline.errors import LmlineError
from lmline.tracking import registry as tracking_registry
from lmline.tracking import store

CFG = PromoteConfig(metric="macro_f1", min_delta=0.01, max_bpb_regression=0.05)


def test_first_model_becomes_champion():
    assert decide(Scores(0.6, 2.0, "s"), None, CFG).promote


@pytest.mark.parametrize(
    "candidate, expected",
    [
        (Scores(0.75, 2.0, "s"), True),  # beats by 0.05 >= min_delta
        (Scores(0.705, 2.0, "s"), False),  # beats, but by less than min_delta
        (Scores(0.70, 2.0, "s"), False),  # a tie keeps the champion
        (Scores(0.50, 2.0, "s"), False),  # worse
        (Scores(0.90, 2.2, "s"), False),  # better task metric, but the base LM regressed past the guard
        (Scores(0.90, 2.04, "s"), True),  # within the bits-per-byte margin
    ],
)
def test_decision_against_a_champion(candidate, expected):
    decision = decide(candidate, Scores(0.70, 2.0, "s"), CFG)
    assert decision.promote is expected
    assert decision.reason


def test_scores_from_different_test_splits_are_not_compared():
    with pytest.raises(ValueError, match="different test splits"):
        decide(Scores(0.9, 2.0, "new"), Scores(0.7, 2.0, "old"), CFG)


@pytest.fixture
def registry(workspace, monkeypatch):
    """A real MLflow registry on SQLite in the workspace, with versions we can point aliases at."""
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = store.client()
    client.create_registered_model("m-classification")

    def new_version() -> int:
        return int(client.create_model_version("m-classification", source=str(workspace / "model")).version)

    return new_version


def never_rescore(version):
    raise AssertionError(f"v{version} should not need re-scoring")


def test_first_better_and_worse_candidates_move_aliases_as_documented(registry):
    v1, v2, v3 = registry(), registry(), registry()
    first = promotion.promote("m-classification", v1, Scores(0.6, 2.0, "s"), CFG, never_rescore, "run-1")
    assert first["promoted"] and int(tracking_registry.alias_version("m-classification", "champion").version) == v1

    better = promotion.promote("m-classification", v2, Scores(0.7, 2.0, "s"), CFG, never_rescore, "run-2")
    assert better["promoted"] and better["champion_before"] == v1
    assert int(tracking_registry.alias_version("m-classification", "champion").version) == v2
    assert tracking_registry.version_tags("m-classification", v2)["lmline.previous_champion"] == str(v1)

    worse = promotion.promote("m-classification", v3, Scores(0.5, 2.0, "s"), CFG, never_rescore, "run-3")
    assert not worse["promoted"]
    assert int(tracking_registry.alias_version("m-classification", "champion").version) == v2
    assert int(tracking_registry.alias_version("m-classification", "challenger").version) == v3
    tags = tracking_registry.version_tags("m-classification", v3)
    assert tags["lmline.decision"] == "rejected" and tags["lmline.decision.flow_run_id"] == "run-3"
    assert tags["lmline.decision.candidate_metric"] == "0.500000"
    assert tags["lmline.decision.champion_metric"] == "0.700000"


def test_champion_is_rescored_when_the_test_split_changed(registry):
    v1, v2 = registry(), registry()
    promotion.promote("m-classification", v1, Scores(0.9, 2.0, "old-split"), CFG, never_rescore)
    rescored = []

    def rescore(version):
        rescored.append(version)
        return Scores(0.55, 2.0, "new-split")  # on the new split the champion is weaker

    result = promotion.promote("m-classification", v2, Scores(0.6, 2.0, "new-split"), CFG, rescore)
    assert rescored == [v1]
    assert result["promoted"] and result["champion_metric"] == 0.55
    assert tracking_registry.version_tags("m-classification", v1)["lmline.eval.test_split"] == "new-split"


def test_manual_promote_and_rollback(registry):
    v1, _v2, v3 = registry(), registry(), registry()
    promotion.promote("m-classification", v1, Scores(0.6, 2.0, "s"), CFG, never_rescore)
    promotion.manual_promote("m-classification", v3, who="alice", why="hotfix")
    assert int(tracking_registry.alias_version("m-classification", "champion").version) == v3
    assert tracking_registry.version_tags("m-classification", v3)["lmline.decision.by"] == "alice"

    back = promotion.rollback("m-classification", who="bob")
    assert back == {"model": "m-classification", "champion_before": v3, "champion_after": v1}
    assert int(tracking_registry.alias_version("m-classification", "champion").version) == v1
    with pytest.raises(LmlineError, match="no previous champion"):
        promotion.rollback("m-classification", who="bob")


# ---------------------------------------------------------------- fails closed: missing scores
@pytest.mark.parametrize(
    "candidate, champion, why",
    [
        (Scores(None, 2.0, "s"), Scores(0.7, 2.0, "s"), "the candidate has no macro_f1"),
        (Scores(None, 2.0, "s"), None, "the candidate has no macro_f1"),  # not even a first model without a score
        (Scores(0.9, 2.0, "s"), Scores(None, 2.0, "s"), "the champion has no macro_f1"),
        (Scores(0.9, None, "s"), Scores(0.7, 2.0, "s"), "the candidate has no base bits/byte"),
        (Scores(0.9, None, "s"), None, "the candidate has no base bits/byte"),
        (Scores(0.9, 2.0, "s"), Scores(0.7, None, "s"), "the champion has no base bits/byte"),
    ],
)
def test_a_missing_score_is_a_reason_not_to_promote(candidate, champion, why):
    decision = decide(candidate, champion, CFG)
    assert not decision.promote and why in decision.reason


def test_lower_is_better_for_bits_per_byte():
    cfg = PromoteConfig(metric="bits_per_byte", min_delta=0.01)
    champion = Scores(1.30, 2.0, "s")
    assert decide(Scores(1.20, 2.0, "s"), champion, cfg).promote
    assert not decide(Scores(1.295, 2.0, "s"), champion, cfg).promote  # better, by less than min_delta
    assert not decide(Scores(1.40, 2.0, "s"), champion, cfg).promote
    assert "lower is better" in decide(Scores(1.20, 2.0, "s"), champion, cfg).reason


@pytest.mark.parametrize(
    "task, metric, resolved",
    [
        ("classification", "auto", "macro_f1"),
        ("causal-lm", "auto", "bits_per_byte"),
        ("classification", "accuracy", "accuracy"),
    ],
)
def test_promote_metric_follows_the_task(make_params, task, metric, resolved):
    params, _ = make_params(tiny_params(finetune={"task": task}, promote={"metric": metric}))
    assert scoring.gate_config(params).metric == resolved


@pytest.mark.parametrize("task, metric", [("causal-lm", "macro_f1"), ("classification", "bits_per_byte")])
def test_a_metric_that_does_not_fit_the_task_fails_naming_the_key(make_params, task, metric):
    with pytest.raises(config.ConfigError, match=f"params.yaml: promote.metric '{metric}' does not fit finetune.task"):
        make_params(tiny_params(finetune={"task": task}, promote={"metric": metric}))


def test_candidate_scores_without_the_metric_are_none_not_a_crash(make_params, workspace):
    params, _ = make_params(tiny_params())
    causal_lm_metrics = {"task": {"test_bits_per_byte": 1.5}, "lm": {"test_bits_per_byte": 2.0}}
    assert scoring.candidate_scores(params, workspace, causal_lm_metrics).metric is None


# ---------------------------------------------------------------- against a real registry
BASE = "m-base"


@pytest.fixture
def gate(registry):
    """v1 champion (fine-tuned from m-base v1, both @champion, scored), v2 a better candidate from m-base v2."""
    client = store.client()
    client.create_registered_model(BASE)
    for _ in range(2):
        client.create_model_version(BASE, source="base-model")
    v1, v2 = registry(), registry()
    tracking_registry.set_version_tags("m-classification", v1, {"lmline.base_model": f"{BASE}/1"})
    tracking_registry.set_version_tags("m-classification", v2, {"lmline.base_model": f"{BASE}/2"})
    promotion.promote("m-classification", v1, Scores(0.6, 2.0, "s"), CFG, never_rescore)
    assert aliases() == {"champion": "1", "challenger": None, "base": "1"}
    return v1, v2


def aliases() -> dict:
    def of(name, alias):
        mv = tracking_registry.alias_version(name, alias)
        return None if mv is None else str(mv.version)

    return {
        "champion": of("m-classification", "champion"),
        "challenger": of("m-classification", "challenger"),
        "base": of(BASE, "champion"),
    }


REGISTRY_CALLS = (
    "get_model_version_by_alias",
    "get_model_version",
    "set_model_version_tag",
    "delete_model_version_tag",
    "set_registered_model_alias",
    "delete_registered_model_alias",
)


def fail_at_call(monkeypatch, n: int) -> list:
    """Fault injection into MLflow (not a mock of our code): the real MlflowClient methods run, except
    that the n-th registry call raises the MlflowException a locked SQLite store raises."""
    calls = []
    for method in REGISTRY_CALLS:
        real = getattr(MlflowClient, method)

        def wrapped(self, *args, _real=real, _method=method, **kwargs):
            calls.append(_method)
            if len(calls) == n:
                raise MlflowException("database is locked (injected)", TEMPORARILY_UNAVAILABLE)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, method, wrapped)
    return calls


GATE_OPERATIONS = {
    "gate promotes": lambda v1, v2: promotion.promote(
        "m-classification", v2, Scores(0.9, 2.0, "s"), CFG, never_rescore
    ),
    "gate rejects": lambda v1, v2: promotion.promote("m-classification", v2, Scores(0.1, 2.0, "s"), CFG, never_rescore),
    "manual promote": lambda v1, v2: promotion.manual_promote("m-classification", v2, "alice", "test"),
}


@pytest.mark.parametrize("operation", GATE_OPERATIONS)
def test_a_registry_error_at_any_call_stops_the_gate_and_moves_no_alias(gate, monkeypatch, operation):
    """Every registry call the operation makes fails once in turn (fault injection into MLflow's client):
    each time a one-line LmlineError naming the store, and the aliases as they were."""
    v1, v2 = gate
    before = aliases()
    n = 1
    while True:
        with monkeypatch.context() as injected:
            calls = fail_at_call(injected, n)
            try:
                GATE_OPERATIONS[operation](v1, v2)
            except LmlineError as exc:
                message = str(exc)
            else:
                break  # the operation made fewer than n calls: every one of them has failed once
        assert "\n" not in message and store.tracking_uri() in message and "database is locked" in message, message
        assert aliases() == before, f"{operation}: failing registry call {n} ({calls[-1]}) moved an alias"
        n += 1
    assert n > 3, "setup: the operation should make several registry calls"
    assert aliases() != before or operation == "gate rejects" and aliases()["challenger"] == str(v2)


def test_a_registry_error_during_rollback_moves_no_alias(gate, monkeypatch):
    v1, v2 = gate
    promotion.promote("m-classification", v2, Scores(0.9, 2.0, "s"), CFG, never_rescore)
    before = aliases()
    n = 1
    while True:
        with monkeypatch.context() as injected:
            fail_at_call(injected, n)
            try:
                promotion.rollback("m-classification", who="bob")
            except LmlineError as exc:
                assert "\n" not in str(exc) and store.tracking_uri() in str(exc)
            else:
                break
        assert aliases() == before
        n += 1
    assert aliases() == {"champion": str(v1), "challenger": None, "base": "1"}


def test_an_alias_not_found_is_no_champion_but_any_other_error_is_not(registry, monkeypatch):
    assert tracking_registry.alias_version("m-classification", "champion") is None  # the model exists, the alias not
    assert tracking_registry.alias_version("never-registered", "champion") is None
    with monkeypatch.context() as injected:
        fail_at_call(injected, 1)
        with pytest.raises(tracking_registry.RegistryError, match="reading m-classification@champion failed"):
            tracking_registry.alias_version("m-classification", "champion")


def test_the_two_champion_aliases_move_together_or_not_at_all(gate):
    """A real failure on the second move: the base version the candidate names was deleted."""
    v1, v2 = gate
    store.client().delete_model_version(BASE, "2")
    with pytest.raises(tracking_registry.RegistryError, match=f"{BASE}@champion at v2"):
        promotion.promote("m-classification", v2, Scores(0.9, 2.0, "s"), CFG, never_rescore)
    assert aliases() == {"champion": str(v1), "challenger": None, "base": "1"}
    assert tracking_registry.version_tags("m-classification", v2)["lmline.decision"] == "failed"
    with pytest.raises(tracking_registry.RegistryError):
        promotion.manual_promote("m-classification", v2, "alice", "test")
    assert aliases() == {"champion": str(v1), "challenger": None, "base": "1"}


def test_a_missing_champion_score_keeps_the_champion(gate):
    v1, v2 = gate
    tracking_registry.set_version_tags(
        "m-classification", v1, {"lmline.eval.bits_per_byte": ""}
    )  # scored without its base LM
    result = promotion.promote("m-classification", v2, Scores(0.9, 2.0, "s"), CFG, never_rescore)
    assert not result["promoted"] and "the champion has no base bits/byte" in result["reason"]
    assert aliases()["champion"] == str(v1)
    assert tracking_registry.version_tags("m-classification", v2)["lmline.decision.reason"] == result["reason"]


# ---------------------------------------------------------------- human decisions stick
def test_a_rolled_back_version_is_never_promoted_again_automatically(gate):
    v1, v2 = gate
    assert promotion.promote("m-classification", v2, Scores(0.9, 2.0, "s"), CFG, never_rescore)["promoted"]
    promotion.rollback("m-classification", who="bob")
    assert aliases() == {"champion": str(v1), "challenger": None, "base": "1"}

    again = promotion.promote("m-classification", v2, Scores(0.9, 2.0, "s"), CFG, never_rescore, "run-2")
    assert not again["promoted"] and "rolled back by bob" in again["reason"]
    assert aliases() == {"champion": str(v1), "challenger": None, "base": "1"}
    tags = tracking_registry.version_tags("m-classification", v2)
    assert tags["lmline.decision"] == "rejected" and "rolled back by bob" in tags["lmline.decision.reason"]

    promotion.manual_promote("m-classification", v2, who="alice", why="fixed after all")  # a person can
    assert aliases() == {"champion": str(v2), "challenger": None, "base": "2"}
    assert promotion.ROLLED_BACK not in tracking_registry.version_tags("m-classification", v2)
