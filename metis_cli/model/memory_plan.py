"""`metis plan`: GPU memory per process of a recipe's sft and hdpo steps, before paying for GPUs.

Torch-free. The model's shape comes from its `config.json` (a local folder; a VL model's
`text_config`), with the parameter count read exactly from its safetensors headers, or from
`KNOWN_MODELS` for hub ids. What is counted, per GPU, for N processes (`--gpus`):
- one process: the model in its dtype, plus fp32 master copies of the trainable weights when the
  dtype is 16-bit (`train.optimizer`); N > 1 (FSDP2): fp32 masters sharded 1/N, frozen weights
  sharded 1/N in their dtype, and the 16-bit copies FSDP gathers to compute: two decoder layers
  at a time (the one running and the one prefetched) and the root (embeddings, final norm, head);
- gradients: fp32, like their masters (1/N each under FSDP);
- Adam: two fp32 states per trainable weight (1/N under FSDP);
- activations of one micro-batch per process (sft: ceil(batch_size / N) sequences of
  max_seq_len tokens; hdpo: micro_batch_size rollouts of max_total_tokens), per token and layer
  `4h + 3q + 3kv + 4i` values (h hidden, q/kv attention widths, i MLP width: the norms' inputs and
  outputs, q/k/v before and after their norms and rotary, the attention output, the MLP's gate,
  up, activation and product); with gradient checkpointing only each layer's input (h) is kept and
  one layer's activations are rebuilt at a time. Attention is taken as memory-efficient (no
  tokens x tokens matrix);
- logits: the compute-dtype logits, their fp32 copy and the fp32 log-softmax kept for backward, of
  at most `logit_chunk_positions` positions when `model.logits_budget_mib` makes the LM head run in
  chunks (train/logit_chunks.py), else of every position of the micro-batch; hdpo micro-batches
  hold at most `hdpo.micro_batch_tokens` tokens when that is set;
- vLLM (hdpo with `rollout.backend: vllm`): `rollout.vllm.gpu_memory_utilization` of the GPU,
  held through the update; with `rollout.vllm.sleep_mode` the engine is asleep during the update
  (its weights in CPU memory), so the step needs the larger of the update (without the engine)
  and the rollout (the engine beside what the trainer keeps between updates: weights, masters,
  Adam states, the runtime overhead -- hdpo frees the gradients after each update;
  `StagePlan.rollout_gib`);
- the HF rollout copy (hdpo on N > 1 processes with `rollout.backend: hf`): each rank samples from
  its own unsharded copy of the whole policy in the compute dtype (`stages/hdpo_dist.rollout_copy`),
  held through the update; one process samples from the training model itself. Either way the HF
  backend's KV cache: `rollout.batch_size` sequences of `rollout.max_total_tokens` at once (the
  worst case; vLLM pages its cache inside its own share);
- RUNTIME_OVERHEAD_GIB for the CUDA context and allocator slack.
Estimates, not measurements: a run that lands within a few GiB of the limit may still not fit.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from metis_cli.errors import ModelError

GIB = 1024**3
RUNTIME_OVERHEAD_GIB = 2.0
"""CUDA context, NCCL buffers and allocator fragmentation: a rule of thumb."""
GATHERED_LAYERS = 2
"""Decoder layers FSDP2 holds unsharded at once: the one computing and the one prefetched."""


def logit_chunk_positions(vocab_size: int, budget_mib: float) -> int:
    """Positions whose fp32 logits and their log-softmax fit in `budget_mib` MiB: the chunk the
    LM head runs in (train/logit_chunks.py)."""
    return max(1, int(budget_mib * 2**20 // (vocab_size * 4 * 2)))


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: the decoder's widths and the parameter count."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    other_params: int = 0
    """Parameters outside the text decoder (a VL model's vision tower and mergers)."""
    counted_params: int | None = None
    """The exact count from the model's safetensors files, when they were read."""

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + 2 * self.head_dim  # q, k, v, o and the q/k norms
        return attention + 3 * h * self.intermediate_size + 2 * h  # gate, up, down; two norms

    @property
    def root_params(self) -> int:
        """Embeddings, final norm and LM head (FSDP's root group)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        if self.counted_params is not None:
            return self.counted_params
        return self.root_params + self.num_layers * self.layer_params + self.other_params

    @property
    def activation_values_per_token_layer(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 4 * h + 3 * q + 3 * kv + 4 * self.intermediate_size


KNOWN_MODELS = {
    "Qwen/Qwen3-VL-8B-Instruct": ModelShape(
        name="Qwen/Qwen3-VL-8B-Instruct", hidden_size=4096, num_layers=36, intermediate_size=12288, num_heads=32,
        num_kv_heads=8, head_dim=128, vocab_size=151936, tie_embeddings=False,
        other_params=576_500_000,  # vision tower (27 blocks of width 1152, MLP 4304) + 4 patch mergers
    ),
    "Qwen/Qwen3-8B": ModelShape(
        name="Qwen/Qwen3-8B", hidden_size=4096, num_layers=36, intermediate_size=12288, num_heads=32,
        num_kv_heads=8, head_dim=128, vocab_size=151936, tie_embeddings=False,
    ),
}
"""Hub models `metis plan` knows without downloading anything (their published config.json)."""


def shape_from_config(config: dict, name: str) -> ModelShape:
    """The shape of a transformers `config.json` (a VL model's decoder is its `text_config`)."""
    text = config.get("text_config") or config
    try:
        heads = text["num_attention_heads"]
        return ModelShape(
            name=name, hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
            intermediate_size=text["intermediate_size"], num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads, vocab_size=text["vocab_size"],
            tie_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )
    except KeyError as missing:
        raise ModelError(f"{name}/config.json has no {missing}: metis plan reads decoder models "
                         "(hidden_size, num_hidden_layers, intermediate_size, num_attention_heads, vocab_size)") from None


def safetensors_params(folder: Path) -> int | None:
    """Exact parameter count from the headers of a folder's *.safetensors files (None: none)."""
    total, found = 0, False
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        found = True
        total += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return total if found else None


def model_shape(recipe) -> ModelShape:
    """The shape of `model.name_or_path`: a local folder, the tiny recipe's model before it is
    built, or a hub id from KNOWN_MODELS."""
    name = recipe.model.name_or_path
    folder = Path(name)
    if (folder / "config.json").exists():
        shape = shape_from_config(json.loads((folder / "config.json").read_text()), name)
        return replace(shape, counted_params=safetensors_params(folder))
    if recipe.model.build_tiny is not None:
        from metis_cli.model.tiny import MARKER_TOKENS, MERGE_BUDGET, SPECIAL_TOKENS

        tiny = recipe.model.build_tiny
        return ModelShape(name=f"{name} (tiny, not built yet)", hidden_size=tiny.hidden_size,
                          num_layers=tiny.num_layers, intermediate_size=tiny.intermediate_size,
                          num_heads=tiny.num_heads, num_kv_heads=tiny.num_heads,
                          head_dim=tiny.hidden_size // tiny.num_heads,
                          vocab_size=256 + MERGE_BUDGET + len(SPECIAL_TOKENS) + len(MARKER_TOKENS), tie_embeddings=True)
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    raise ModelError(f"model.name_or_path: {name} is neither a local model folder nor a model metis plan knows "
                     f"({', '.join(KNOWN_MODELS)}); download it (its config.json and safetensors are enough) "
                     "and point model.name_or_path at the folder")


def lora_params(shape: ModelShape, lora) -> int:
    """Trainable LoRA weights: r x (in + out) per adapted projection per layer."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    per_layer = sum(lora.r * sum(sizes[m]) for m in lora.target_modules if m in sizes)
    return per_layer * shape.num_layers


@dataclass
class StagePlan:
    stage: str
    tokens_per_micro_batch: int
    rows: dict[str, float] = field(default_factory=dict)
    """Component -> GiB per GPU."""
    rollout_gib: float | None = None
    """With vLLM's sleep mode: GiB per GPU while the engine samples (it sleeps in the update)."""
    engine_weights_gib: float | None = None
    """With vLLM: the policy's weights in the engine's share, per GPU (1 / tensor_parallel_size of them)."""
    engine_gib: float | None = None
    """With vLLM: the engine's share of a GPU (weights + KV cache)."""
    engine_tensor_parallel: int = 1

    @property
    def engine_kv_gib(self) -> float | None:
        """With vLLM: what the engine's share leaves for its KV cache (<= 0: the weights do not fit)."""
        return None if self.engine_gib is None else self.engine_gib - self.engine_weights_gib

    @property
    def update_gib(self) -> float:
        return sum(self.rows.values())

    @property
    def total_gib(self) -> float:
        return max(self.update_gib, self.rollout_gib or 0.0)


def plan_stage(shape: ModelShape, recipe, stage: str, gpus: int, gpu_memory_gib: float,
               *, checkpointing: bool | None = None) -> StagePlan:
    """GiB per GPU of one training step of `stage` ("sft" or "hdpo") on `gpus` processes;
    `checkpointing` overrides `run.distributed.gradient_checkpointing`."""
    dtype = recipe.model.dtype  # "auto" is bf16 on a GPU
    stored = 4 if dtype == "float32" else 2
    compute = 4 if dtype == "float32" or (dtype == "float16" and gpus > 1) else 2
    lora = recipe.model.lora.enabled
    params = shape.params
    trainable = lora_params(shape, recipe.model.lora) if lora else params
    frozen = params - trainable
    rows: dict[str, float] = {}
    if gpus == 1 and lora:
        rows["weights (LoRA in fp32)"] = (frozen * stored + trainable * 4) / GIB
    elif gpus == 1:
        rows["weights"] = params * stored / GIB
        if stored != 4:
            rows["fp32 masters"] = trainable * 4 / GIB
    else:
        rows["fp32 masters (sharded)"] = trainable * 4 / gpus / GIB
        if frozen:
            rows["frozen weights (sharded)"] = frozen * stored / gpus / GIB
        gathered = GATHERED_LAYERS * shape.layer_params + shape.root_params
        rows["gathered layers"] = gathered * compute / GIB
    rows["gradients (fp32)"] = trainable * 4 / gpus / GIB
    rows["Adam states (fp32)"] = trainable * 8 / gpus / GIB
    # held between updates (hdpo frees the gradients after each update, before the rollouts)
    kept_gib = sum(gib for name, gib in rows.items() if name not in ("gathered layers", "gradients (fp32)"))

    if stage == "sft":
        tokens = math.ceil(recipe.sft.batch_size / gpus) * recipe.sft.max_seq_len
    else:
        tokens = recipe.hdpo.micro_batch_size * recipe.rollout.max_total_tokens
        if recipe.hdpo.micro_batch_tokens is not None:  # a longer single rollout still runs alone
            tokens = min(tokens, max(recipe.hdpo.micro_batch_tokens, recipe.rollout.max_total_tokens))
    one_layer = shape.activation_values_per_token_layer * compute * tokens
    if recipe.run.distributed.gradient_checkpointing if checkpointing is None else checkpointing:
        rows["activations (ckpt)"] = (shape.num_layers * shape.hidden_size * compute * tokens + one_layer) / GIB
    else:
        rows["activations"] = shape.num_layers * one_layer / GIB
    logits_bytes = compute + 4 + (4 if compute != 4 else 0)  # a 4-byte compute dtype needs no fp32 copy
    budget = recipe.model.logits_budget_mib
    positions = tokens if budget is None else min(tokens, logit_chunk_positions(shape.vocab_size, budget))
    rows["logits" if positions == tokens else "logits (chunked)"] = positions * shape.vocab_size * logits_bytes / GIB
    engine_gib, asleep = 0.0, False
    if stage == "hdpo" and recipe.rollout.backend == "vllm":
        engine_gib, asleep = recipe.rollout.vllm.gpu_memory_utilization * gpu_memory_gib, recipe.rollout.vllm.sleep_mode
        rows["vLLM engine (asleep in the update)" if asleep else "vLLM engine"] = 0.0 if asleep else engine_gib
    elif stage == "hdpo":
        if gpus > 1:
            rows["rollout copy (unsharded)"] = params * compute / GIB
        kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * compute
        rows["rollout KV cache (hf)"] = recipe.rollout.batch_size * recipe.rollout.max_total_tokens * kv_per_token / GIB
    rows["runtime overhead"] = RUNTIME_OVERHEAD_GIB
    plan = StagePlan(stage, tokens, rows)
    if asleep:
        plan.rollout_gib = kept_gib + RUNTIME_OVERHEAD_GIB + engine_gib
    if stage == "hdpo" and recipe.rollout.backend == "vllm":
        plan.engine_gib = engine_gib
        plan.engine_tensor_parallel = recipe.rollout.vllm.tensor_parallel_size
        plan.engine_weights_gib = params * compute / plan.engine_tensor_parallel / GIB
    return plan
