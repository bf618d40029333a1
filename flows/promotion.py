"""The promotion gate: a pure decision (candidate vs champion scores -> promote or not, and why), plus
the registry moves that carry it out through lmline.tracking.

Aliases on `<name>-<task>`:
- `champion`: the version serving as the best model ever measured. Moves only when a candidate beats it
  on `promote.metric` by at least `promote.min_delta`, measured on the same test split, and no guard
  fails. The very first model becomes champion.
- `challenger`: the latest candidate that did not win.
Every decision is recorded on the candidate version as `lmline.decision.*` tags; the promoted version
carries `lmline.previous_champion`, which `lmline rollback` follows back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lmline import tracking
from lmline.config import PromoteConfig

PROMOTE_LIMIT = "lmline-promote"  # Prefect global concurrency limit: one promotion at a time, everywhere


@dataclass(frozen=True)
class Scores:
    metric: float  # promote.metric (accuracy or macro-F1) on the test split
    bits_per_byte: float | None  # the base LM's test bits per byte (guard)
    test_split: str  # md5 of the test split the scores were measured on


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate: Scores, champion: Scores | None, cfg: PromoteConfig) -> Decision:
    """Pure: should the candidate replace the champion?"""
    if champion is None:
        return Decision(True, "first model: there was no champion")
    if candidate.test_split != champion.test_split:
        raise ValueError("candidate and champion were scored on different test splits: re-score the champion first")
    if candidate.bits_per_byte is not None and champion.bits_per_byte is not None:
        worse_by = candidate.bits_per_byte - champion.bits_per_byte
        if worse_by > cfg.max_bpb_regression:
            return Decision(
                False,
                f"guard failed: base bits/byte {candidate.bits_per_byte:.4f} is worse than the champion's "
                f"{champion.bits_per_byte:.4f} by {worse_by:.4f} > {cfg.max_bpb_regression}",
            )
    delta = candidate.metric - champion.metric
    if delta > 0 and delta >= cfg.min_delta:
        return Decision(True, f"{cfg.metric} {candidate.metric:.4f} beats {champion.metric:.4f} by {delta:+.4f}")
    return Decision(
        False,
        f"{cfg.metric} {candidate.metric:.4f} does not beat {champion.metric:.4f} by at least "
        f"max(min_delta={cfg.min_delta}, >0) (delta {delta:+.4f})",
    )


SCORE_TAGS = ("lmline.eval.metric", "lmline.eval.bits_per_byte", "lmline.eval.test_split")


def scores_to_tags(scores: Scores, metric: str) -> dict[str, str]:
    return {
        "lmline.eval.metric_name": metric,
        "lmline.eval.metric": f"{scores.metric:.6f}",
        "lmline.eval.bits_per_byte": "" if scores.bits_per_byte is None else f"{scores.bits_per_byte:.6f}",
        "lmline.eval.test_split": scores.test_split,
    }


def scores_from_tags(tags: dict[str, str], metric: str) -> Scores | None:
    if tags.get("lmline.eval.metric_name") != metric or not all(t in tags for t in SCORE_TAGS):
        return None
    bpb = tags["lmline.eval.bits_per_byte"]
    return Scores(float(tags["lmline.eval.metric"]), float(bpb) if bpb else None, tags["lmline.eval.test_split"])


def promote(
    name: str,
    version: int,
    candidate: Scores,
    cfg: PromoteConfig,
    rescore: Callable[[int], Scores],
    flow_run_id: str = "",
) -> dict:
    """Compare `version` with the current champion and move the aliases. The caller holds the
    promotion concurrency slot. `rescore(v)` measures version v on the candidate's test split."""
    tracking.set_version_tags(name, version, scores_to_tags(candidate, cfg.metric))
    before = tracking.alias_version(name, "champion")
    champion_version = int(before.version) if before else None
    if champion_version == version:
        return {"model": name, "candidate": version, "champion_before": version, "champion_after": version,
                "promoted": False, "reason": "candidate is already the champion", "candidate_metric": candidate.metric,
                "champion_metric": candidate.metric}
    champion = None
    if before is not None:
        champion = scores_from_tags(dict(before.tags), cfg.metric)
        if champion is None or champion.test_split != candidate.test_split:
            champion = rescore(champion_version)  # the test split changed since it was scored
            tracking.set_version_tags(name, champion_version, scores_to_tags(champion, cfg.metric))
    decision = decide(candidate, champion, cfg)
    tracking.set_version_tags(
        name,
        version,
        {
            "lmline.decision": "promoted" if decision.promote else "rejected",
            "lmline.decision.reason": decision.reason,
            "lmline.decision.candidate_metric": f"{candidate.metric:.6f}",
            "lmline.decision.champion_metric": "" if champion is None else f"{champion.metric:.6f}",
            "lmline.decision.champion_version": "" if champion_version is None else str(champion_version),
            "lmline.decision.flow_run_id": flow_run_id,
        },
    )
    if decision.promote:
        if champion_version is not None:
            tracking.set_version_tags(name, version, {"lmline.previous_champion": champion_version})
        set_champion(name, version)
        challenger = tracking.alias_version(name, "challenger")
        if challenger is not None and int(challenger.version) == version:
            tracking.delete_alias(name, "challenger")
    else:
        tracking.set_alias(name, "challenger", version)
    return {
        "model": name,
        "candidate": version,
        "champion_before": champion_version,
        "champion_after": version if decision.promote else champion_version,
        "promoted": decision.promote,
        "reason": decision.reason,
        "candidate_metric": candidate.metric,
        "champion_metric": None if champion is None else champion.metric,
    }


def set_champion(name: str, version: int) -> None:
    """Point `champion` at the version, and at the base LM it was fine-tuned from, so that
    `models:/<name>-base@champion` is the language model behind the champion classifier."""
    tracking.set_alias(name, "champion", version)
    base = tracking.version_tags(name, version).get("lmline.base_model", "")
    base_name, _, base_version = base.partition("/")
    if base_name and base_version:
        tracking.set_alias(base_name, "champion", int(base_version))


def manual_promote(name: str, version: int, who: str, why: str) -> dict:
    """`lmline promote`: move champion by hand, recording who and why on the version."""
    before = tracking.alias_version(name, "champion")
    tracking.client().get_model_version(name, str(version))  # fails clearly if the version does not exist
    tags = {"lmline.decision": "promoted-manually", "lmline.decision.by": who, "lmline.decision.reason": why}
    if before is not None and int(before.version) != version:
        tags["lmline.previous_champion"] = before.version
    tracking.set_version_tags(name, version, tags)
    set_champion(name, version)
    return {"model": name, "champion_before": before and int(before.version), "champion_after": version}


def rollback(name: str, who: str) -> dict:
    """`lmline rollback`: champion back to the version it replaced."""
    from lmline.errors import LmlineError

    current = tracking.alias_version(name, "champion")
    if current is None:
        raise LmlineError(f"{name}: has no champion to roll back")
    previous = dict(current.tags).get("lmline.previous_champion")
    if not previous:
        raise LmlineError(f"{name}: champion v{current.version} has no previous champion recorded")
    tracking.set_version_tags(name, current.version, {"lmline.rolled_back_by": who})
    set_champion(name, int(previous))
    return {"model": name, "champion_before": int(current.version), "champion_after": int(previous)}
