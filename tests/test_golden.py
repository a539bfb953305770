"""Golden values: a few sft and hdpo steps on a fixed tiny model reproduce recorded metrics.

torchtune keeps such tests for its recipes: a silent numeric change (a loss normalised
differently, a seed derived differently, a token masked differently, advantages computed in
another order) fails here even when every unit test still passes.

The run goes through the CLI (`metis sft tiny` / `metis hdpo tiny` with `--set` overrides), so
it pins what a user gets, whatever the stages look like inside. A 2-layer, 32-wide model is
built from config (seed 0, one thread); sft trains it on 64 synthetic knowledge sums, then on a
small file of two questions answered directly or through the calculator, some answers wrong, so
the hdpo rollouts that follow have correct and wrong answers with 0 or 1 tool calls and both
advantage channels are non-zero. hdpo then runs 3 steps (estimator hdpo), 2 steps with grpo, and
2 steps with ppo_epochs=2 and kl_coef=0.1 (old log-probs, clipping and the KL path).

Every value must come out within 1e-4 (absolute or relative) of the one recorded. The recorded values may
only change with a deliberate numeric change, said so in the CHANGELOG; a refactor must leave
them alone. To re-record, run

    python tests/test_golden.py

which prints a new `GOLDEN = {...}` literal to paste over the one at the end of this file (run
it on the code whose numbers you mean to keep; `PYTHONPATH=<checkout>` picks the checkout whose
`metis_cli` is measured, and the first line it prints to stderr names it). Review the diff.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-4
"""Float32 sums over a few steps drift between machines and installs of the same versions, and
between equivalent code paths (seen: loss 2.0478940 here, 2.0478824 where it was recorded; a KL of
0.042055 vs 0.042027 once the reference's log-probs came from the plain pass); a real numeric
change (a loss normalised differently, a token masked differently) moves figures by far more."""
SYSTEM_PROMPT = "Answer the question. Use the calculator if needed."
QUESTIONS = [("2 + 3", "5", "6"), ("4 + 4", "8", "9")]  # expression, right answer, the wrong one taught
SFT_FIELDS = ("step", "loss", "eval_loss")
HDPO_FIELDS = (
    "step", "loss", "loss_acc", "loss_tool", "accuracy", "format_ok", "tool_calls_mean", "tool_call_ratio",
    "r_acc_mean", "r_tool_mean", "adv_acc_std", "adv_acc_nonzero", "adv_tool_nonzero",
    "efficiency_group_share", "clip_frac_acc", "clip_frac_tool", "kl", "entropy", "logprob_mismatch",
    "generated_tokens", "rollouts_trained",
)
EVAL_FIELDS = ("eval/easy/accuracy", "eval/easy/tool_call_ratio", "eval/easy/tool_calls_mean", "eval/hard/tool_calls_mean")
HDPO_RUNS = {
    "hdpo": {"hdpo.estimator": "hdpo", "hdpo.steps": "3"},
    "grpo": {"hdpo.estimator": "grpo", "hdpo.steps": "2"},
    "hdpo_ppo_kl": {"hdpo.estimator": "hdpo", "hdpo.steps": "2", "hdpo.ppo_epochs": "2", "hdpo.kl_coef": "0.1",
                    "hdpo.micro_batch_size": "3"},
}


def _tool_call(expression: str) -> str:
    return '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>' % expression


def write_data(folder: Path) -> None:
    """sft.jsonl: per question 8 demonstrations, half direct and half through the calculator, a
    quarter with the wrong answer. rl.jsonl: the two questions as RL prompts."""
    sft, rl = [], []
    for q, (expression, right, wrong) in enumerate(QUESTIONS):
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"What is {expression}?"}]
        rl.append({"id": f"rl-{q}", "messages": prompt, "answer": right, "subset": "easy"})
        for k in range(8):
            answer = {"role": "assistant", "content": f"<answer>{wrong if k % 4 == 3 else right}</answer>"}
            via_tool = [{"role": "assistant", "content": _tool_call(expression)},
                        {"role": "tool", "name": "calculator", "content": right}]
            sft.append({"id": f"sft-{q}-{k}", "messages": prompt + ([] if k % 2 else via_tool) + [answer],
                        "answer": right, "subset": "easy"})
    for name, rows in (("sft.jsonl", sft), ("rl.jsonl", rl)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def overrides(folder: Path, **extra: str) -> list[str]:
    settings = {
        "run.output_dir": str(folder / "run"), "run.threads": "1", "run.seed": "0",
        "model.build_tiny.hidden_size": "32", "model.build_tiny.num_layers": "2",
        "model.build_tiny.num_heads": "2", "model.build_tiny.intermediate_size": "64",
        "data.synthetic.knowledge_examples": "64", "data.synthetic.eval_per_subset": "2",
        "data.rl": f'[{{path: "{folder / "rl.jsonl"}"}}]',
        "data.eval": f'[{{path: "synthetic:eval"}}, {{path: "{folder / "rl.jsonl"}"}}]',
        "sft.phases.0.epochs": "1",
        "sft.phases.1.data": f'[{{path: "{folder / "sft.jsonl"}"}}]', "sft.phases.1.epochs": "40",
        "sft.batch_size": "8", "sft.lr": "1e-2", "sft.eval_share": "0.1",
        "sft.eval_every": "1000", "sft.save_every": "1000",
        "hdpo.prompts_per_step": "2", "hdpo.group_size": "8", "hdpo.micro_batch_size": "8", "hdpo.lr": "1e-3",
        "hdpo.schedule": "constant", "hdpo.ptx.coef": "0",
        "hdpo.eval_every": "1000", "hdpo.save_every": "1000", "hdpo.samples_to_save": "0",
        "rollout.max_new_tokens": "24", "rollout.max_total_tokens": "128",
        **extra,
    }
    return [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _invoke(args: list[str]) -> None:
    from typer.testing import CliRunner

    from metis_cli.cli.main import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def _series(path: Path, fields: tuple[str, ...]) -> dict[str, list]:
    """{field: its values in step order, over the records that have it} from a metrics.jsonl."""
    records = _metrics(path)
    return {field: [r[field] for r in records if field in r] for field in fields}


def run_sft(folder: Path) -> dict[str, list]:
    """Writes the data, builds the tiny model, runs sft; the recorded fields."""
    write_data(folder)
    _invoke(["sft", "tiny", "--quiet", *overrides(folder)])
    return _series(folder / "run" / "sft" / "metrics.jsonl", SFT_FIELDS)


def run_hdpo(folder: Path, name: str) -> dict[str, list]:
    """hdpo from the sft model in `folder` (run_sft first); the recorded fields."""
    output = folder / "run" / name
    _invoke(["hdpo", "tiny", "--quiet", *overrides(folder, **HDPO_RUNS[name], **{"hdpo.output": str(output)})])
    return _series(output / "metrics.jsonl", HDPO_FIELDS + EVAL_FIELDS)


def _mismatches(actual: dict[str, list], expected: dict[str, list]) -> list[str]:
    problems = []
    for field in expected:
        got, want = actual.get(field, []), expected[field]
        if len(got) != len(want):
            problems.append(f"{field}: {len(got)} values, recorded {len(want)}")
            continue
        for position, (a, b) in enumerate(zip(got, want)):
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
            same = (math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE, abs_tol=TOLERANCE) or (math.isnan(a) and math.isnan(b))
                    if numbers else a == b)
            if not same:
                problems.append(f"{field}[{position}]: got {a!r}, recorded {b!r}")
    return problems


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, monkeypatch_module) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("golden")
    monkeypatch_module.chdir(folder)  # `tiny` is then the built-in recipe, not a file of that name
    return folder, run_sft(folder)


@pytest.fixture(scope="module")
def hdpo_run(sft_run):
    """hdpo_run(name) -> the recorded fields of that run, each run once per module."""
    folder, _ = sft_run
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            done[name] = run_hdpo(folder, name)
        return done[name]

    return get


def test_sft_losses_match_recorded_values(sft_run):
    problems = _mismatches(sft_run[1], GOLDEN["sft"])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(HDPO_RUNS))
def test_hdpo_metrics_match_recorded_values(hdpo_run, name):
    problems = _mismatches(hdpo_run(name), GOLDEN[name])
    assert not problems, "\n".join(problems)


def test_sft_moves_every_parameter(sft_run, parameters_left_unchanged):
    run = sft_run[0] / "run"
    assert not parameters_left_unchanged(run / "base", run / "sft" / "final")


@pytest.mark.parametrize("name", list(HDPO_RUNS))
def test_hdpo_moves_every_parameter(sft_run, hdpo_run, parameters_left_unchanged, name):
    hdpo_run(name)
    run = sft_run[0] / "run"
    assert not parameters_left_unchanged(run / "sft" / "final", run / name / "final")


def record() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chdir(folder)
        values = {"sft": run_sft(folder)}
        for name in HDPO_RUNS:
            values[name] = run_hdpo(folder, name)
    return values


# Recorded on commit 845fa16 (before the issue-12 redesign) with `python tests/test_golden.py`.
GOLDEN = {'sft': {'step': [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                  26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48,
                  49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71,
                  72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83],
         'loss': [6.122945997450087, 5.562765333387587, 5.120858510335286, 4.741303337944879,
                  4.382698265281883, 4.1539005952722885, 4.002545525045956, 3.8519795735677085,
                  4.611376780383992, 4.623748323810634, 3.8697446740191914, 3.864937397971082,
                  3.4721410115559896, 3.132579803466797, 2.850084700674381, 2.7168724060058596,
                  2.676533257783349, 1.8646375215970552, 2.298577626546224, 2.2173960671496036,
                  2.0478823679798053, 1.8393217842533904, 1.862359687463561, 1.885685251719916,
                  1.597681441397037, 1.406475139114092, 1.374357835301813, 1.2796056946711754,
                  1.2483265088952107, 1.1935102101918813, 1.0337503873384917, 0.9970203399658203,
                  0.8830555597941081, 0.8611574315313083, 0.8888577875101341, 0.7453476066019997,
                  0.7121499259516878, 0.6852633158365885, 0.6276134822679602, 0.6276418325063344,
                  0.6097444866014563, 0.5137262486699802, 0.5239902178446452, 0.581379548558649,
                  0.4895462180083653, 0.49160173204210067, 0.5723405495668069, 0.4295479036727042,
                  0.4861337462467934, 0.48101381985646374, 0.4248082160949707, 0.4242500191304221,
                  0.4364240034571234, 0.43932817567069576, 0.417841370900472, 0.3938016749140042,
                  0.444964599609375, 0.438837424568508, 0.4058474414753464, 0.38776255365627915,
                  0.39605795542399086, 0.41225001497088737, 0.4282711982727051, 0.375173597193476,
                  0.4130106801572053, 0.4270021438598633, 0.37411454518636067, 0.3945871988932292,
                  0.45532061019033754, 0.3489549001057943, 0.3758210596048607, 0.4174375534057617,
                  0.35844374991752004, 0.370737687596735, 0.4104928970336914, 0.4625379122220553,
                  0.3886192957560221, 0.36472986705267607, 0.38380069732666017, 0.3269085670585063,
                  0.447339543756449, 0.4168331578092755, 0.3684059143066406],
         'eval_loss': [2.2985204748205237]},
 'hdpo': {'step': [0, 1, 2, 3],
          'loss': [-0.012885205447673798, 0.19636287540197372, -0.007210619747638702],
          'loss_acc': [-0.07574167847633362, 0.13255071640014648, -0.07677684724330902],
          'loss_tool': [0.4190431237220764, 0.42541444301605225, 0.46377483010292053],
          'accuracy': [0.4375, 0.375, 0.4375],
          'format_ok': [0.875, 0.8125, 0.8125],
          'tool_calls_mean': [0.625, 0.3125, 0.4375],
          'tool_call_ratio': [0.625, 0.3125, 0.375],
          'r_acc_mean': [0.48124995827674866, 0.41874995827674866, 0.47499996423721313],
          'r_tool_mean': [0.28125, 0.34375, 0.34375],
          'adv_acc_std': [0.9354123239944606, 0.935412310610234, 0.9354122571364627],
          'adv_acc_nonzero': [1.0, 1.0, 1.0],
          'adv_tool_nonzero': [0.25, 0.1875, 0.3125],
          'efficiency_group_share': [1.0, 1.0, 1.0],
          'clip_frac_acc': [0.0, 0.0, 0.0],
          'clip_frac_tool': [0.0, 0.0, 0.0],
          'kl': [0.0, 0.0, 0.0],
          'entropy': [0.6498714721024926, 0.7414055206988117, 0.7055473227367222],
          'logprob_mismatch': [1.1687403061264987e-07, 1.375775479634132e-07, 1.355727114372219e-07],
          'generated_tokens': [134, 101, 107],
          'rollouts_trained': [16, 16, 16],
          'eval/easy/accuracy': [0.25, 0.25],
          'eval/easy/tool_call_ratio': [0.0, 0.0],
          'eval/easy/tool_calls_mean': [0.0, 0.0],
          'eval/hard/tool_calls_mean': [0.0, 0.0]},
 'grpo': {'step': [0, 1, 2],
          'loss': [-0.07574167847633362, 0.13255071640014648],
          'loss_acc': [-0.07574167847633362, 0.13255071640014648],
          'loss_tool': [0.0, 0.0],
          'accuracy': [0.4375, 0.375],
          'format_ok': [0.875, 0.8125],
          'tool_calls_mean': [0.625, 0.3125],
          'tool_call_ratio': [0.625, 0.3125],
          'r_acc_mean': [0.48124995827674866, 0.41874995827674866],
          'r_tool_mean': [0.28125, 0.34375],
          'adv_acc_std': [0.9354123239944606, 0.935412310610234],
          'adv_acc_nonzero': [1.0, 1.0],
          'adv_tool_nonzero': [],
          'efficiency_group_share': [1.0, 1.0],
          'clip_frac_acc': [0.0, 0.0],
          'clip_frac_tool': [0.0, 0.0],
          'kl': [0.0, 0.0],
          'entropy': [0.6498714721024926, 0.7381361067885219],
          'logprob_mismatch': [1.1687403061264987e-07, 1.1386109853861348e-07],
          'generated_tokens': [134, 101],
          'rollouts_trained': [16, 16],
          'eval/easy/accuracy': [0.25, 0.25],
          'eval/easy/tool_call_ratio': [0.0, 0.0],
          'eval/easy/tool_calls_mean': [0.0, 0.0],
          'eval/hard/tool_calls_mean': [0.0, 0.0]},
 'hdpo_ppo_kl': {'step': [0, 1, 2],
                 'loss': [-0.01288517378270626, 0.17268284037709236],
                 'loss_acc': [-0.0757416330743581, 0.1163913793861866],
                 'loss_tool': [0.41904304921627045, 0.3752763271331787],
                 'accuracy': [0.4375, 0.375],
                 'format_ok': [0.875, 0.75],
                 'tool_calls_mean': [0.625, 0.3125],
                 'tool_call_ratio': [0.625, 0.3125],
                 'r_acc_mean': [0.48124995827674866, 0.41249996423721313],
                 'r_tool_mean': [0.28125, 0.34375],
                 'adv_acc_std': [0.9354123239944606, 0.9354122460064032],
                 'adv_acc_nonzero': [1.0, 1.0],
                 'adv_tool_nonzero': [0.25, 0.1875],
                 'efficiency_group_share': [1.0, 1.0],
                 'clip_frac_acc': [0.0, 0.0],
                 'clip_frac_tool': [0.0, 0.0],
                 'kl': [0.004664133593036947, 0.042027357819617965],
                 'entropy': [0.6498714801090868, 0.7472587613498463],
                 'logprob_mismatch': [1.1153630313869985e-07, 1.2541810601827392e-07],
                 'generated_tokens': [134, 102],
                 'rollouts_trained': [16, 16],
                 'eval/easy/accuracy': [0.25, 0.25],
                 'eval/easy/tool_call_ratio': [0.0, 0.0],
                 'eval/easy/tool_calls_mean': [0.0, 0.0],
                 'eval/hard/tool_calls_mean': [0.0, 0.0]}}


if __name__ == "__main__":
    import pprint

    import metis_cli

    print(f"# recorded with {metis_cli.__file__}", file=sys.stderr)
    print("GOLDEN = " + pprint.pformat(record(), width=110, compact=True, sort_dicts=False))
