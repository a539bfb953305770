"""The metrics.jsonl contract: every field a trainer writes (name, stage, meaning, unit), and the reader.

Each training stage appends one JSON object per step to `<stage folder>/metrics.jsonl`
(docs/metrics.md); non-finite numbers are written as null, and a field missing from a line means
"not measured at this step". This module is the one place that names those fields: writers
(`stages/sft.py`, `stages/hdpo.py` through its `StepMetrics`) write only names defined here (a
test checks every key a real run writes), and readers (the dashboard, the training curves of
`metis eval`'s plot, the benchmarks) take the names from the constants below instead of spelling
them out. Held-out eval figures during RL are keyed `eval/<subset>/<figure>` (`eval_key`).

Torch-free and dependency-free: the dashboard and `metis watch` import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Stage = Literal["sft", "hdpo", "both"]


@dataclass(frozen=True)
class MetricField:
    """One metrics.jsonl field: its key, the stage that writes it ("both": sft and hdpo), what it
    means, and its unit ("share": a fraction in [0, 1]; "count": per step; "" for labels)."""

    name: str
    stage: Stage
    help: str
    unit: str = ""


FIELDS: list[MetricField] = []
"""Every field, in the order docs/metrics.md lists them."""


def _field(name: str, stage: Stage, help: str, unit: str = "") -> str:
    FIELDS.append(MetricField(name, stage, help, unit))
    return name


# ------------------------------------------------------------------------------ both stages
STAGE = _field("stage", "both", '"sft" or "hdpo"')
STEP = _field("step", "both", "steps completed, from 1; hdpo's step 0 is the eval before training", "count")
TOTAL_STEPS = _field("total_steps", "both", "steps the stage will run", "count")
TIME = _field("time", "both", "Unix time when the record was made", "s")
LR = _field("lr", "both", "learning rate used for this step")
LOSS = _field("loss", "both", "sft: token-mean cross-entropy over the step's assistant tokens; "
              "hdpo: w_acc * L_acc + w_tool * L_tool of the first PPO epoch (KL excluded)", "nats")
TOKENS_PER_S = _field("tokens_per_s", "both", "sft: trained tokens / step_s; hdpo: generated_tokens / rollout_s",
                      "tokens/s")
STEP_S = _field("step_s", "both", "wall time of the step (hdpo: rollouts, scoring, update; no eval or saving)", "s")
ELAPSED_S = _field("elapsed_s", "both", "wall time since this session of the stage started", "s")
CHECKPOINT = _field("checkpoint", "both", "path of the checkpoint written after this step (only on such steps)")
GRAD_NORM = _field("grad_norm", "both", "total L2 norm of the gradients before clipping "
                   "(hdpo: of the update's first optimizer step; absent when no rollout was trained)")
UPDATE_RMS = _field("update_rms", "both", "root mean square of this step's change of the trainable fp32 master "
                    "weights (hdpo: of the update's first optimizer step)")
WORLD_SIZE = _field("world_size", "both", "processes training together", "count")

# -------------------------------------------------------------------------------------- sft
EPOCH = _field("epoch", "sft", "passes over the current phase's data so far")
PHASE = _field("phase", "sft", "index of the sft.phases entry this step trained")
EVAL_LOSS = _field("eval_loss", "sft", "token-mean cross-entropy on the held-out share (sft.eval_share)", "nats")

# ----------------------------------------------------------------- hdpo: rollouts and rewards
ESTIMATOR = _field("estimator", "hdpo", "hdpo.estimator: hdpo, grpo, coupled or gdpo")
ACCURACY = _field("accuracy", "hdpo", "share of scored rollouts whose answer is correct (null when none is scored)",
                  "share")
R_ACC_MEAN = _field("r_acc_mean", "hdpo", "mean accuracy reward r_acc over scored rollouts (null when none)")
R_TOOL_MEAN = _field("r_tool_mean", "hdpo", "mean efficiency reward r_tool over scored rollouts (null when none)")
FORMAT_OK = _field("format_ok", "hdpo", "share of rollouts that pass the format check", "share")
TOOL_CALL_RATIO = _field("tool_call_ratio", "hdpo", "share of rollouts with at least one tool call", "share")
TOOL_CALLS_MEAN = _field("tool_calls_mean", "hdpo", "tool calls per rollout (T, malformed and refused included)")
TOOL_ERRORS = _field("tool_errors", "hdpo", "error observations of every kind", "count")
TOOL_TIMEOUTS = _field("tool_timeouts", "hdpo", "error observations of kind timeout", "count")
MALFORMED_TOOL_CALLS = _field("malformed_tool_calls", "hdpo", "error observations of kind malformed", "count")
UNSCORED = _field("unscored", "hdpo", "rollouts the judge could not score after retries (excluded, not wrong)",
                  "count")
TRUNCATED = _field("truncated", "hdpo", "rollouts that ended at a token limit", "count")
ROLLOUTS_TRAINED = _field("rollouts_trained", "hdpo", "rollouts the update used (scored, in a kept group)", "count")
GENERATED_TOKENS = _field("generated_tokens", "hdpo", "tokens the sampler generated (tool output excluded)", "count")
RESPONSE_TOKENS_MEAN = _field("response_tokens_mean", "hdpo", "generated_tokens per rollout", "tokens")
EFFICIENCY_GROUP_SHARE = _field("efficiency_group_share", "hdpo", "share of groups with |Q| >= 2 correct scored "
                                "rollouts, where the efficiency channel is on (the implicit curriculum)", "share")
TOOL_CALL_RATIO_CORRECT = _field("tool_call_ratio_correct", "hdpo", "share of correct scored rollouts with at least "
                                 "one tool call (null when none is correct): blind tool use on answers the model "
                                 "got right", "share")
TOOL_CALL_RATIO_WRONG = _field("tool_call_ratio_wrong", "hdpo", "share of wrong scored rollouts with at least one "
                               "tool call (null when none is wrong)", "share")
TURN_BUDGET_SHARE = _field("turn_budget_share", "hdpo", "share of rollouts that used up rollout.max_turns (finish "
                           "reason max_turns)", "share")
TOKEN_BUDGET_SHARE = _field("token_budget_share", "hdpo", "share of rollouts that hit a token limit (finish reason "
                            "length)", "share")

# ------------------------------------------------------ hdpo: advantages over scored rollouts
ADV_ACC_MEAN = _field("adv_acc_mean", "hdpo", "mean accuracy-channel advantage (baselines: their one advantage)")
ADV_ACC_STD = _field("adv_acc_std", "hdpo", "population std of the accuracy-channel advantages")
ADV_ACC_NONZERO = _field("adv_acc_nonzero", "hdpo", "share of rollouts with A_acc != 0", "share")
ADV_TOOL_MEAN = _field("adv_tool_mean", "hdpo", "mean efficiency-channel advantage (estimator hdpo only)")
ADV_TOOL_STD = _field("adv_tool_std", "hdpo", "population std of the efficiency-channel advantages (hdpo only)")
ADV_TOOL_NONZERO = _field("adv_tool_nonzero", "hdpo", "share of rollouts with A_tool != 0 (hdpo only)", "share")

# ------------------------------------------- hdpo: the update (only when a rollout was trained)
LOSS_ACC = _field("loss_acc", "hdpo", "unweighted accuracy-channel loss L_acc", "nats")
LOSS_TOOL = _field("loss_tool", "hdpo", "unweighted efficiency-channel loss L_tool (baselines: 0)", "nats")
CLIP_FRAC_ACC = _field("clip_frac_acc", "hdpo", "share of L_acc's tokens whose clipped term was active", "share")
CLIP_FRAC_TOOL = _field("clip_frac_tool", "hdpo", "share of L_tool's tokens whose clipped term was active", "share")
KL = _field("kl", "hdpo", "k3 KL to the frozen initial policy, token mean over PPO epochs (0 when kl_coef is 0)",
            "nats")
PTX_LOSS = _field("ptx_loss", "hdpo", "token-mean cross-entropy of the rehearsal rows (hdpo.ptx), first PPO epoch, "
                  "mean over mini-batches; absent when hdpo.ptx is off", "nats")
ENTROPY = _field("entropy", "hdpo", "mean entropy of the temperature-scaled next-token distribution on trained "
                 "tokens", "nats")
LOGPROB_MISMATCH = _field("logprob_mismatch", "hdpo", "mean |trainer log-prob - sampler log-prob| on trained "
                          "tokens, before the update", "nats")

# ------------------------------------------------------------------------------ hdpo: timing
ROLLOUT_S = _field("rollout_s", "hdpo", "sampling the rollouts, tool calls and scoring", "s")
UPDATE_S = _field("update_s", "hdpo", "the update and the weight sync to the backend", "s")


# ---------------------------------------------------------------- hdpo: held-out eval figures
EVAL_PREFIX = "eval"
EVAL_FIGURES: tuple[MetricField, ...] = (
    MetricField(ACCURACY, "hdpo", "share of the subset's scored answers that are correct (null when none is "
                "scored)", "share"),
    MetricField(TOOL_CALL_RATIO, "hdpo", "share of the subset's answers with at least one tool call", "share"),
    MetricField(TOOL_CALLS_MEAN, "hdpo", "tool calls per answer in the subset"),
)
"""Figures of the greedy held-out pass (step 0, every hdpo.eval_every steps, the last step),
logged per subset as `eval/<subset>/<figure>`."""


def eval_key(subset: str, figure: str) -> str:
    """`eval/<subset>/<figure>`, e.g. eval_key("hard", TOOL_CALL_RATIO) == "eval/hard/tool_call_ratio"."""
    return f"{EVAL_PREFIX}/{subset}/{figure}"


def split_eval_key(key: str) -> tuple[str, str] | None:
    """(subset, figure) of an `eval/<subset>/<figure>` key; None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != EVAL_PREFIX or not parts[1]:
        return None
    return parts[1], parts[2]


TOOLS_PREFIX = "tools"
TOOL_FIGURES: tuple[MetricField, ...] = (
    MetricField("calls", "hdpo", "calls of this tool in the step's rollouts", "count"),
    MetricField("errors", "hdpo", "error observations of its calls, of every kind", "count"),
    MetricField("timeouts", "hdpo", "error observations of kind timeout", "count"),
)
"""Per enabled tool per step, keyed `tools/<tool>/<figure>`; calls naming no enabled tool count
under `tools/other/...`, malformed ones (no name) under `malformed_tool_calls` only."""


def tool_key(tool: str, figure: str) -> str:
    """`tools/<tool>/<figure>`, e.g. tool_key("python", "timeouts") == "tools/python/timeouts"."""
    return f"{TOOLS_PREFIX}/{tool}/{figure}"


def split_tool_key(key: str) -> tuple[str, str] | None:
    """(tool, figure) of a `tools/<tool>/<figure>` key; None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != TOOLS_PREFIX or not parts[1]:
        return None
    return parts[1], parts[2]


def fields(stage: str) -> dict[str, MetricField]:
    """The fields one stage ("sft" or "hdpo") may write, by name (eval figures not included)."""
    return {f.name: f for f in FIELDS if f.stage in (stage, "both")}


def unknown_keys(record: dict) -> list[str]:
    """Keys of a metrics.jsonl record that the schema does not define for its `stage`."""
    known = fields(str(record.get(STAGE)))
    eval_figures = {f.name for f in EVAL_FIGURES}
    tool_figures = {f.name for f in TOOL_FIGURES}
    hdpo = record.get(STAGE) == "hdpo"
    unknown = []
    for key in record:
        split, per_tool = split_eval_key(key), split_tool_key(key)
        if key in known or (hdpo and split is not None and split[1] in eval_figures) \
                or (hdpo and per_tool is not None and per_tool[1] in tool_figures):
            continue
        unknown.append(key)
    return unknown


# ---------------------------------------------------------------------------------- reading
def parse_json_lines(lines: list[bytes]) -> tuple[list[dict], int]:
    """Parse complete JSONL lines; returns (objects, count of corrupt lines). Blank lines are skipped."""
    objects: list[dict] = []
    corrupt = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            corrupt += 1
            continue
        if isinstance(value, dict):
            objects.append(value)
        else:
            corrupt += 1
    return objects, corrupt


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl, in file order; corrupt lines (and a last line still being
    written) are skipped. `tui.metrics_tail.MetricsTail` follows a growing file instead."""
    records, _corrupt = parse_json_lines(Path(path).read_bytes().split(b"\n"))
    return records
