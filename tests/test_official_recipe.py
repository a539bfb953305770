"""recipes/8b-official.yaml holds the official Metis run's settings (Accio-Lab/Metis
examples/train/train_metis.sh and the verl defaults it leaves), one for one, and differs from
recipes/8b.yaml only where metis's own choice differs from the reference code's. The README's
table "The official run, flag by flag" lists the same mapping for users."""

from __future__ import annotations

from pathlib import Path

import pytest

from metis_cli.recipe.load import load_recipe

REPO = Path(__file__).resolve().parents[1]

OFFICIAL = {
    # metis field: value                        # official flag (train_metis.sh, or the verl default it keeps)
    "hdpo.estimator": "hdpo",                   # algorithm.adv_estimator=hdpo
    "hdpo.group_size": 16,                      # actor_rollout_ref.rollout.n=16
    "hdpo.prompts_per_step": 128,               # data.train_batch_size=16*8 (one node of 8 GPUs)
    "hdpo.mini_batches": 2,                     # actor.ppo_mini_batch_size=8*8 = 64 prompts
    "hdpo.ppo_epochs": 1,                       # actor.ppo_epochs=1 (default)
    "hdpo.steps": 200,                          # trainer.total_training_steps=200
    "hdpo.lr": 1e-6,                            # actor.optim.lr=1e-6, lr_warmup_steps=-1, constant schedule
    "hdpo.schedule": "constant", "hdpo.warmup_ratio": 0.0,
    "hdpo.weight_decay": 0.01,                  # actor.optim.weight_decay=0.01 (default)
    "hdpo.grad_clip": 1.0,                      # actor.grad_clip=1.0 (default)
    "hdpo.clip_eps": 0.2,                       # actor.clip_ratio=0.2 (default)
    "hdpo.dual_clip_c": 3.0,                    # actor.clip_ratio_c=3.0 (default)
    "hdpo.loss_agg": "micro_batch_token_mean",  # actor.loss_agg_mode=token-mean, per micro-batch
    "hdpo.kl_coef": 0.0,                        # algorithm.kl_ctrl.kl_coef=0, actor.use_kl_loss=False
    "hdpo.ptx.coef": 0.0,                       # no SFT loss in the actor update (verl has none)
    "hdpo.w_acc": 1.0,                          # actor.w_acc=1.0
    "hdpo.w_tool": 0.15,                        # actor.w_tool=$W_TOOL (0.15)
    "hdpo.drop_no_signal_groups": False,        # no dynamic sampling (algorithm.filter_groups unset)
    "hdpo.save_every": 50,                      # trainer.save_freq=50
    "rollout.backend": "vllm",                  # actor_rollout_ref.rollout.name=vllm
    "rollout.vllm.tensor_parallel_size": 1,     # rollout.tensor_model_parallel_size=1
    "rollout.temperature": 1.0,                 # rollout.temperature=1.0
    "rollout.top_p": 1.0,                       # rollout.top_p=1.0
    "rollout.max_turns": 11,                    # agent.max_turns=10 (10 tool calls, then a last turn)
    "rollout.max_response_tokens": 16384,       # agent.max_response_length=16384
    "rollout.max_new_tokens": 16384,            # agent.max_action_length=16384
    "rollout.max_total_tokens": 24576 + 16384,  # agent.max_prompt_length=24576 + the response
    "rollout.max_observation_tokens": 8192,     # agent.max_obs_length=8192
    "tools.max_calls_per_rollout": 10,          # agent.max_turns=10
    "reward.acc_weight": 0.9,                   # reward manager: 0.9 * correct + 0.1 * format_ok
    "reward.format_weight": 0.1,
    "reward.format": "reason",                  # reward manager's format rule
    "reward.answer_position": "first",          # the first <answer>...</answer>
    "reward.checker": "judge",                  # an OpenAI-compatible LLM judge
    "reward.judge.contract": "official",        # CORRECT/INCORRECT on the whole prompt, temperature 0, 30 s, 2 tries
    "reward.judge.on_failure": "incorrect",     # a failed judge call scores 0
    "tools.python.persistent": True,            # one Jupyter kernel per trajectory
    "tools.python.wall_timeout_s": 20,          # 20 s per call
    "tools.search.backend": "http",             # text_search: a web search API
    "tools.search.top_k": 10,                   # top 10 results
}

METIS_CHOICES = {"reward.judge.on_failure", "hdpo.loss_agg", "hdpo.eval_every", "hdpo.save_every",
                 "reward.judge.model", "reward.judge.api_key_env"}
"""Where recipes/8b.yaml keeps metis's own choice (or its own judge and schedule of evals and
checkpoints) and recipes/8b-official.yaml the reference code's; nothing else may differ."""


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items() for key, leaf in _flat(item, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): value}


@pytest.fixture(scope="module")
def recipes():
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        return {name: _flat(load_recipe(f"recipes/{name}.yaml").model_dump()) for name in ("8b", "8b-official")}


@pytest.mark.parametrize("field", sorted(OFFICIAL))
def test_the_official_recipe_has_the_official_setting(recipes, field):
    assert recipes["8b-official"][field] == OFFICIAL[field]


def test_the_official_recipe_differs_from_8b_only_where_metis_chooses_otherwise(recipes):
    mine, official = recipes["8b"], recipes["8b-official"]

    def same(a, b) -> bool:  # the run name reaches every output folder
        return repr(a) == repr(b).replace("metis-8b-official", "metis-8b")

    differ = {field for field in mine.keys() | official.keys()
              if field != "run.name" and not same(mine.get(field), official.get(field))}
    assert differ == METIS_CHOICES
    assert mine["hdpo.loss_agg"] == "batch_token_mean" and mine["reward.judge.on_failure"] == "unscored"
