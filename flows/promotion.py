"""The promotion gate: a pure decision (candidate vs champion scores -> promote or not, and why), plus
the registry moves that carry it out through lmline.tracking.registry.

Aliases on `<name>-<task>`:
- `champion`: the version serving as the best model ever measured. Moves only when a candidate beats it
  on `promote.metric` by at least `promote.min_delta`, measured on the same test split, and no guard
  fails. The very first model becomes champion. `<name>-base@champion` moves with it (to the base LM
  the champion was fine-tuned from): both move or neither does.
- `challenger`: the latest candidate that did not win.
Every decision is recorded on the candidate version as `lmline.decision.*` tags; the promoted version
carries `lmline.previous_champion`, which `lmline rollback` follows back.

Fails closed: a registry that cannot answer stops the gate with a one-line error and moves nothing;
a score that is missing (either side, task metric or bits/byte guard) is a reason not to promote.
Human decisions stick: a version a person rolled back carries `lmline.rolled_back`, and the automatic
gate never promotes it again; only `lmline promote` (which clears the mark) can.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

from lmline.config import LOWER_IS_BETTER, PromoteConfig
from lmline.errors import LmlineError
from lmline.tracking import registry

PROMOTE_LIMIT = "lmline-promote"  # Prefect global concurrency limit: one promotion at a time, everywhere
ROLLED_BACK = "lmline.rolled_back"  # on a version a person rolled back: who; the gate refuses it
ROLLED_BACK_TAGS = (ROLLED_BACK, "lmline.rolled_back_by")  # the second: older versions' spelling


@contextlib.contextmanager
def promotion_slot():
    """Hold the one promotion slot (a Prefect global concurrency limit) while aliases are read and moved:
    the automatic gate, `lmline promote` and `lmline rollback` all go through here, so none of them
    decides on a champion another is moving."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(PROMOTE_LIMIT, 1)
    with concurrency(PROMOTE_LIMIT, occupy=1, strict=True):
        yield


@dataclass(frozen=True)
class Scores:
    metric: float | None  # promote.metric on the test split (None: not measured)
    bits_per_byte: float | None  # the base LM's test bits per byte (guard; None: not measured)
    test_split: str  # md5 of the test split the scores were measured on


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate: Scores, champion: Scores | None, cfg: PromoteConfig) -> Decision:
    """Pure: should the candidate replace the champion? `cfg.metric` must be resolved (not `auto`)."""
    if cfg.metric == "auto":
        raise ValueError("decide() needs the resolved metric: PromoteConfig.resolved(task)")
    if candidate.metric is None:
        return Decision(False, f"not compared: the candidate has no {cfg.metric} score")
    if candidate.bits_per_byte is None:
        return Decision(False, "guard not checked: the candidate has no base bits/byte")
    if champion is None:
        return Decision(True, "first model: there was no champion")
    if candidate.test_split != champion.test_split:
        raise ValueError("candidate and champion were scored on different test splits: re-score the champion first")
    if champion.metric is None:
        return Decision(False, f"not compared: the champion has no {cfg.metric} score")
    if champion.bits_per_byte is None:
        return Decision(False, "guard not checked: the champion has no base bits/byte")
    worse_by = candidate.bits_per_byte - champion.bits_per_byte
    if worse_by > cfg.max_bpb_regression:
        return Decision(
            False,
            f"guard failed: base bits/byte {candidate.bits_per_byte:.4f} is worse than the champion's "
            f"{champion.bits_per_byte:.4f} by {worse_by:.4f} > {cfg.max_bpb_regression}",
        )
    lower = cfg.metric in LOWER_IS_BETTER
    gain = champion.metric - candidate.metric if lower else candidate.metric - champion.metric
    direction = " (lower is better)" if lower else ""
    if gain > 0 and gain >= cfg.min_delta:
        return Decision(
            True, f"{cfg.metric} {candidate.metric:.4f} beats {champion.metric:.4f} by {gain:.4f}{direction}"
        )
    return Decision(
        False,
        f"{cfg.metric} {candidate.metric:.4f} does not beat {champion.metric:.4f} by at least "
        f"max(min_delta={cfg.min_delta}, >0) (gain {gain:+.4f}){direction}",
    )


SCORE_TAGS = ("lmline.eval.metric", "lmline.eval.bits_per_byte", "lmline.eval.test_split")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def scores_to_tags(scores: Scores, metric: str) -> dict[str, str]:
    return {
        "lmline.eval.metric_name": metric,
        "lmline.eval.metric": _number(scores.metric),
        "lmline.eval.bits_per_byte": _number(scores.bits_per_byte),
        "lmline.eval.test_split": scores.test_split,
    }


def scores_from_tags(tags: dict[str, str], metric: str) -> Scores | None:
    if tags.get("lmline.eval.metric_name") != metric or not all(t in tags for t in SCORE_TAGS):
        return None
    value, bpb = tags["lmline.eval.metric"], tags["lmline.eval.bits_per_byte"]
    return Scores(float(value) if value else None, float(bpb) if bpb else None, tags["lmline.eval.test_split"])


def rolled_back_by(tags: dict[str, str]) -> str | None:
    return next((tags[t] for t in ROLLED_BACK_TAGS if t in tags), None)


def promote(
    name: str,
    version: int,
    candidate: Scores,
    cfg: PromoteConfig,
    rescore: Callable[[int], Scores],
    flow_run_id: str = "",
) -> dict:
    """Compare `version` with the current champion and move the aliases. The caller holds the
    promotion slot (promotion_slot()). `rescore(v)` measures version v on the candidate's test split.
    A registry error anywhere raises registry.RegistryError and leaves every alias where it was."""
    registry.set_version_tags(name, version, scores_to_tags(candidate, cfg.metric))
    before = registry.alias_version(name, "champion")
    champion_version = int(before.version) if before else None
    result = {
        "model": name,
        "candidate": version,
        "champion_before": champion_version,
        "champion_after": champion_version,
        "promoted": False,
        "challenger": False,
        "candidate_metric": candidate.metric,
    }
    if champion_version == version:
        return {**result, "reason": "candidate is already the champion", "champion_metric": candidate.metric}
    champion = None
    refused_by = rolled_back_by(registry.version_tags(name, version))
    if refused_by is not None:
        decision = Decision(
            False, f"v{version} was rolled back by {refused_by}: only `lmline promote` can make it champion again"
        )
    else:
        if before is not None:
            champion = scores_from_tags(dict(before.tags), cfg.metric)
            if champion is None or champion.test_split != candidate.test_split:
                champion = rescore(champion_version)  # the test split changed since it was scored
                registry.set_version_tags(name, champion_version, scores_to_tags(champion, cfg.metric))
        decision = decide(candidate, champion, cfg)
    decision_tags = {
        "lmline.decision": "promoted" if decision.promote else "rejected",
        "lmline.decision.reason": decision.reason,
        "lmline.decision.candidate_metric": _number(candidate.metric),
        "lmline.decision.champion_metric": "" if champion is None else _number(champion.metric),
        "lmline.decision.champion_version": "" if champion_version is None else str(champion_version),
        "lmline.decision.flow_run_id": flow_run_id,
    }
    if decision.promote and champion_version is not None:
        decision_tags["lmline.previous_champion"] = str(champion_version)
    # Tags first, aliases last: whatever fails before the move leaves the aliases untouched.
    registry.set_version_tags(name, version, decision_tags)
    if decision.promote:
        challenger = registry.alias_version(name, "challenger")
        clear = [(name, "challenger", None)] if challenger is not None and int(challenger.version) == version else []
        moves = champion_moves(name, version) + clear
    else:
        moves = (
            [] if refused_by is not None else [(name, "challenger", version)]
        )  # a rolled-back version is no challenger
    try:
        registry.move_aliases(moves)
    except registry.RegistryError:
        with contextlib.suppress(LmlineError):  # best effort: the registry is failing already
            registry.set_version_tags(name, version, {"lmline.decision": "failed"})
        raise
    return {
        **result,
        "champion_after": version if decision.promote else champion_version,
        "promoted": decision.promote,
        "challenger": bool(moves) and not decision.promote,
        "reason": decision.reason,
        "champion_metric": None if champion is None else champion.metric,
    }


def champion_moves(name: str, version: int) -> list[tuple[str, str, int]]:
    """`champion` on the version, and on the base LM it was fine-tuned from, so that
    `models:/<name>-base@champion` is the language model behind the champion model."""
    moves = [(name, "champion", version)]
    base = registry.version_tags(name, version).get("lmline.base_model", "")
    base_name, _, base_version = base.partition("/")
    if base_name and base_version:
        moves.append((base_name, "champion", int(base_version)))
    return moves


def set_champion(name: str, version: int) -> None:
    """Point both champion aliases (task model and its base LM) at `version`: both or neither."""
    registry.move_aliases(champion_moves(name, version))


def manual_promote(name: str, version: int, who: str, why: str) -> dict:
    """`lmline promote`: move champion by hand, recording who and why on the version. A person may
    bring back a rolled-back version: this clears its mark. The caller holds the promotion slot."""
    before = registry.alias_version(name, "champion")
    marks = {
        t: v for t, v in registry.version_tags(name, version).items() if t in ROLLED_BACK_TAGS
    }  # fails clearly if no such version
    tags = {"lmline.decision": "promoted-manually", "lmline.decision.by": who, "lmline.decision.reason": why}
    if before is not None and int(before.version) != version:
        tags["lmline.previous_champion"] = before.version
    registry.set_version_tags(name, version, tags)
    registry.delete_version_tags(name, version, list(marks))  # before the move: nothing may fail after it
    try:
        set_champion(name, version)
    except registry.RegistryError:
        with contextlib.suppress(LmlineError):  # best effort: it is not champion, so it stays rolled back
            registry.set_version_tags(name, version, marks)
        raise
    return {"model": name, "champion_before": before and int(before.version), "champion_after": version}


def rollback(name: str, who: str) -> dict:
    """`lmline rollback`: champion back to the version it replaced; the version rolled back is marked so
    the automatic gate never promotes it again. The caller holds the promotion slot."""
    current = registry.alias_version(name, "champion")
    if current is None:
        raise LmlineError(f"{name}: has no champion to roll back")
    previous = dict(current.tags).get("lmline.previous_champion")
    if not previous:
        raise LmlineError(f"{name}: champion v{current.version} has no previous champion recorded")
    registry.set_version_tags(name, current.version, {ROLLED_BACK: who})
    try:
        set_champion(name, int(previous))
    except registry.RegistryError:
        with contextlib.suppress(LmlineError):  # best effort: the champion did not move, so neither did it roll back
            registry.delete_version_tags(name, current.version, [ROLLED_BACK])
        raise
    return {"model": name, "champion_before": int(current.version), "champion_after": int(previous)}
