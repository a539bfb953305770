"""When an hdpo run must stop because something outside metis is failing (docs/faults.md).

After a step's rollouts are scored and before anything is trained, `FaultGuard.observe` says
whether to stop:
  - the judge gave no verdict for any answer of the step (at least one was sent): at once;
  - it gave none for more than `reward.judge.max_unscored_share` of the step's answers, for
    `reward.judge.patience` steps in a row;
  - an outside tool service (`tools.search.http`, `agent.tools.base.ServiceCalls`) failed every
    request of the step (after the tool's own retries): at once.
"No verdict" counts rollouts left unscored and, with `reward.judge.on_failure: incorrect`, those
scored wrong only because the judge failed. A rollout without an answer is scored wrong without
asking the judge and is not counted either way.

Pure bookkeeping: scores and counters in, the reason out. The stage writes the checkpoint and
raises (stages/hdpo.py); this module must not touch models, files or the network.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JudgeFigures:
    """How the judge did on one step: answers sent to it, and how many got no verdict."""

    answers: int
    no_verdict: int

    @classmethod
    def of(cls, scores) -> JudgeFigures:
        """From a step's `rewards.scoring.RolloutScore`s."""
        sent = [s for s in scores if s.answer is not None]
        return cls(len(sent), sum(s.correct is None or s.scoring_failed for s in sent))

    @property
    def share(self) -> float:
        return self.no_verdict / self.answers if self.answers else 0.0


class FaultGuard:
    """Counts failing steps across a run; `observe` returns why to stop, or None."""

    def __init__(self, *, judge_url: str | None = None, max_unscored_share: float = 0.5, patience: int = 3,
                 services: list | None = None):
        self.judge_url = judge_url
        self.max_unscored_share = max_unscored_share
        self.patience = patience
        self.services = list(services or [])  # ServiceCalls of the tools with an outside service
        self.steps_over_share = 0
        self._at_step_start: list[tuple[int, int]] = []

    def begin_step(self) -> None:
        """Mark where the services' counters stand, so `observe` sees this step's requests only."""
        self._at_step_start = [(s.requests, s.answered) for s in self.services]

    def observe(self, judge: JudgeFigures) -> str | None:
        """Why the run must stop after this step's scoring (one sentence naming the field and URL),
        or None. Call `begin_step` before the step's rollouts."""
        for service, (requests_before, answered_before) in zip(self.services, self._at_step_start):
            requests = service.requests - requests_before
            if requests and service.answered == answered_before:
                return (f"the service at {service.url} ({service.field}) failed all {requests} requests of the "
                        "step, after retries: it is down or refusing them")
        if not judge.no_verdict:
            self.steps_over_share = 0
            return None
        where = f"the judge at {self.judge_url} (reward.judge)"
        if judge.no_verdict == judge.answers:
            return (f"{where} gave no verdict for any of the step's {judge.answers} answers: it is down, "
                    "failing, or not replying with a verdict")
        self.steps_over_share = self.steps_over_share + 1 if judge.share > self.max_unscored_share else 0
        if self.steps_over_share >= self.patience:
            return (f"{where} gave no verdict for {judge.share:.0%} of the step's answers, more than "
                    f"reward.judge.max_unscored_share ({self.max_unscored_share:g}), for {self.patience} steps in "
                    "a row")
        return None
