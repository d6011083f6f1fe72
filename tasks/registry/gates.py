"""Promotion gates as pure functions: recipe gates + candidate metrics + champion metrics → decision.

No MLflow here: ``tasks/registry.py`` reads the metrics and moves aliases, ``flows/promote.py`` wires
the two. A decision lists every gate (name, metric, value, op, threshold, pass) so the MLflow tag, the
JSON artifact and the Prefect markdown all say exactly why a candidate was or was not promoted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from schemas.eval_config import PromoteConfig

CONTRACT_METRIC = "contract_success"  # 1.0 when the dataset had no critical contract breach
HEAD_TO_HEAD_PREFIX = "champion."  # tasks/evaluation/stage.py: the champion measured in the candidate's evaluation
ROLLED_BACK_METRIC = "rolled_back"  # 1.0 when the version was champion once and was rolled back (registry state)


def contract_ok(manifest: dict) -> bool:
    """No critical contract breach in the dataset (warnings allowed), from its manifest.json summary."""
    contract = manifest.get("contract") or {}
    critical = (contract.get("totals") or {}).get("critical_failures")
    return critical == 0 if critical is not None else bool(contract.get("success", False))


@dataclass
class GateResult:
    name: str
    metric: str
    value: float | None
    op: str
    threshold: float | None
    passed: bool
    note: str = ""


@dataclass
class Decision:
    model: str
    version: int
    passed: bool
    gates: list[GateResult] = field(default_factory=list)
    champion_version: int | None = None
    champion_source: str = ""  # where the champion's numbers came from (same-run head-to-head or its own tags)
    action: str = "reject"  # promote | reject | rollback | noop

    @property
    def failed(self) -> list[str]:
        return [g.name for g in self.gates if not g.passed]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["failed"] = self.failed
        return out

    def to_markdown(self) -> str:
        verdict = (
            "PASSED — champion moved"
            if self.action == "promote"
            else (
                f"{self.action.upper()}"
                if self.action != "reject"
                else f"REJECTED — failing: {', '.join(self.failed)}"
            )
        )
        lines = [
            f"# Promotion of `{self.model}` version {self.version}: {verdict}",
            "",
            f"Current champion before this decision: {self.champion_version or 'none'}"
            + (f" ({self.champion_source})" if self.champion_source else ""),
            "",
            "| gate | metric | value | op | threshold | pass | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in self.gates:
            lines.append(
                f"| {g.name} | {g.metric} | {_fmt(g.value)} | {g.op} | {_fmt(g.threshold)} | "
                f"{'✅' if g.passed else '❌'} | {g.note} |"
            )
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def _compare(value: float | None, op: str, threshold: float) -> bool:
    if value is None or math.isnan(value):
        return False
    return value >= threshold if op == ">=" else value <= threshold


def _absolute(name: str, metric: str, value: float | None, op: str, threshold: float, missing: str) -> GateResult:
    return GateResult(
        name, metric, value, op, threshold, _compare(value, op, threshold), "" if value is not None else missing
    )


def rollback_gate(candidate: dict[str, float]) -> GateResult:
    """A version rolled back from champion stays out: an unchanged re-run (reused stages) maps to it again,
    with gates that pass again, and would undo the rollback."""
    value = candidate.get(ROLLED_BACK_METRIC, 0.0)  # registry state, not an evaluation: absent = never rolled back
    note = (
        ""
        if value == 0.0
        else ("rolled back from champion: train a new model (or delete the version's tag `promotion.rolled_back_at`)")
    )
    return GateResult("not_rolled_back", ROLLED_BACK_METRIC, value, "<=", 0.0, value == 0.0, note)


def champion_gate(name: str, gate, candidate: dict[str, float], champion: dict[str, float] | None) -> GateResult:
    """Candidate not worse than the champion on ``gate.metric``: within ``gate.tolerance`` of the champion's
    value, or, for a candidate-vs-champion metric, at ``gate.threshold``."""
    value = candidate.get(gate.metric)
    if champion is None:
        return GateResult(name, gate.metric, value, gate.op, None, True, "no champion yet")
    if gate.threshold is not None:
        return head_to_head_gate(name, gate, value, candidate, champion)
    ref = champion.get(gate.metric)
    if ref is None or value is None:
        missing = "champion" if ref is None else "candidate"
        return GateResult(name, gate.metric, value, gate.op, None, False, f"metric missing for the {missing}")
    threshold = ref - gate.tolerance if gate.op == ">=" else ref + gate.tolerance
    note = f"champion {ref:.4g}, tolerance {gate.tolerance:g}"
    return GateResult(name, gate.metric, value, gate.op, threshold, _compare(value, gate.op, threshold), note)


def head_to_head_gate(name: str, gate, value: float | None, candidate: dict, champion: dict) -> GateResult:
    """A candidate-vs-champion metric (both answered the same prompts in the candidate's evaluation) against an
    absolute threshold. It counts only if measured against the champion now sitting: ``champion["version"]``
    exists only when the champion's numbers come from the candidate's own evaluation (``champion_reference``)."""
    measured = candidate.get(HEAD_TO_HEAD_PREFIX + "version")
    if champion.get("version") is None or measured != champion["version"]:
        against = f"v{measured:g}" if measured is not None else "no champion"
        note = f"measured against {against}, not the current champion: evaluate again (run align)"
        return GateResult(name, gate.metric, value, gate.op, gate.threshold, False, note)
    passed = _compare(value, gate.op, gate.threshold)
    note = f"vs champion v{champion['version']:g}" if value is not None else "metric missing from the evaluation"
    return GateResult(name, gate.metric, value, gate.op, gate.threshold, passed, note)


def evaluate_gates(
    config: PromoteConfig, candidate: dict[str, float], champion: dict[str, float] | None
) -> list[GateResult]:
    """Every gate of the recipe on the candidate's metrics (and the champion's, for relative gates).

    A metric missing from the candidate fails its gate (a gate is never silently skipped); relative
    gates pass when there is no champion yet (on an empty registry the first good candidate wins).
    """
    results = [rollback_gate(candidate)]
    if config.require_contract_success:
        value = candidate.get(CONTRACT_METRIC)
        results.append(
            _absolute(
                "data_contract", CONTRACT_METRIC, value, ">=", 1.0, "no contract result recorded for the dataset"
            )
        )
    for name, gate in config.gates.items():
        value = candidate.get(gate.metric)
        results.append(
            _absolute(
                name, gate.metric, value, gate.op, gate.threshold, "metric missing from the candidate's evaluation"
            )
        )
    results += [champion_gate(name, gate, candidate, champion) for name, gate in config.champion_gates.items()]
    return results


def decide(
    model: str,
    version: int,
    config: PromoteConfig,
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: int | None = None,
    champion_source: str = "",
) -> Decision:
    """The promotion decision: promote only when every gate passes."""
    gates = evaluate_gates(config, candidate, champion)
    passed = all(g.passed for g in gates)
    if champion_version == version:
        return Decision(model, version, passed, gates, champion_version, champion_source, "noop")
    return Decision(
        model, version, passed, gates, champion_version, champion_source, "promote" if passed else "reject"
    )


def champion_reference(
    candidate: dict[str, float], champion_version: int | None, champion_own: dict[str, float], same_dataset: bool
) -> tuple[dict[str, float] | None, str]:
    """The champion's numbers to compare with, and where they come from.

    Preferred: the champion measured inside the candidate's own evaluation (same prompts, same reward
    model, same seed). Else the champion's own evaluation, but only on the same dataset version; else
    nothing (its relative gates then fail as "missing for the champion": re-evaluate on the same data).
    """
    if champion_version is None:
        return None, ""
    h2h = {k[len(HEAD_TO_HEAD_PREFIX) :]: v for k, v in candidate.items() if k.startswith(HEAD_TO_HEAD_PREFIX)}
    if h2h.get("version") == float(champion_version):
        return h2h, f"measured in the candidate's evaluation (same prompts and reward model), v{champion_version}"
    if same_dataset:
        return champion_own, f"champion v{champion_version}'s own evaluation on the same dataset version"
    return {}, f"champion v{champion_version} was evaluated on another dataset version: not comparable"
