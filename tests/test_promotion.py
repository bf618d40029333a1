"""The promotion gate: the pure decision, and the alias moves against a real MLflow SQLite registry."""
from __future__ import annotations

import pytest

from flows import promotion
from flows.promotion import Scores, decide
from lmline import tracking
from lmline.config import PromoteConfig
from lmline.errors import LmlineError

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
    client = tracking.client()
    client.create_registered_model("m-classification")

    def new_version() -> int:
        return int(client.create_model_version("m-classification", source=str(workspace / "model")).version)

    return new_version


def never_rescore(version):
    raise AssertionError(f"v{version} should not need re-scoring")


def test_first_better_and_worse_candidates_move_aliases_as_documented(registry):
    v1, v2, v3 = registry(), registry(), registry()
    first = promotion.promote("m-classification", v1, Scores(0.6, 2.0, "s"), CFG, never_rescore, "run-1")
    assert first["promoted"] and int(tracking.alias_version("m-classification", "champion").version) == v1

    better = promotion.promote("m-classification", v2, Scores(0.7, 2.0, "s"), CFG, never_rescore, "run-2")
    assert better["promoted"] and better["champion_before"] == v1
    assert int(tracking.alias_version("m-classification", "champion").version) == v2
    assert tracking.version_tags("m-classification", v2)["lmline.previous_champion"] == str(v1)

    worse = promotion.promote("m-classification", v3, Scores(0.5, 2.0, "s"), CFG, never_rescore, "run-3")
    assert not worse["promoted"]
    assert int(tracking.alias_version("m-classification", "champion").version) == v2
    assert int(tracking.alias_version("m-classification", "challenger").version) == v3
    tags = tracking.version_tags("m-classification", v3)
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
    assert tracking.version_tags("m-classification", v1)["lmline.eval.test_split"] == "new-split"


def test_manual_promote_and_rollback(registry):
    v1, v2, v3 = registry(), registry(), registry()
    promotion.promote("m-classification", v1, Scores(0.6, 2.0, "s"), CFG, never_rescore)
    promotion.manual_promote("m-classification", v3, who="alice", why="hotfix")
    assert int(tracking.alias_version("m-classification", "champion").version) == v3
    assert tracking.version_tags("m-classification", v3)["lmline.decision.by"] == "alice"

    back = promotion.rollback("m-classification", who="bob")
    assert back == {"model": "m-classification", "champion_before": v3, "champion_after": v1}
    assert int(tracking.alias_version("m-classification", "champion").version) == v1
    with pytest.raises(LmlineError, match="no previous champion"):
        promotion.rollback("m-classification", who="bob")
