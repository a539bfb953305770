"""Build the tiny Qwen3 model the embedded default recipe trains, with no downloads.

It owns the tokenizer (byte-level BPE trained here, on the synthetic task's rendered
conversations), the Qwen-style chat template and the randomly initialised Qwen3 weights, saved
together as one Hugging Face model folder that transformers and vLLM load like any hub model.
It does not train the model (that is `metis sft` / `metis hdpo`).

Tokenizer choices, and why:
- Byte-level BPE: any text (tool output, user input) is encodable and decodes back exactly.
- Digits are never merged (each digit is its own pre-token), so arithmetic carries over from
  learnt sums to unseen numbers.
- Markers the rollout engine and parsers look for are single added tokens: chat markers, tool-call
  and answer tags, and the fixed JSON prefix/suffix of a calculator call.
- BPE merges are trained on the fixed text of the task (system prompt, tool listing, question
  wording), so a whole tool-using trajectory is a few dozen tokens; CPU time scales with tokens.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from metis_cli.data import synthetic
from metis_cli.errors import ModelError

PAD_TOKEN = "<|endoftext|>"
END_OF_TURN_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", END_OF_TURN_TOKEN]
"""Control tokens: skipped by `decode(skip_special_tokens=True)`."""

CALCULATOR_CALL_PREFIX = '{"name": "calculator", "arguments": {"expression": "'
CALCULATOR_CALL_SUFFIX = '"}}'
MARKER_TOKENS = [
    "<tool_call>", "</tool_call>", "<answer>", "</answer>",
    "<tool_response>", "</tool_response>", "<tools>", "</tools>",
    CALCULATOR_CALL_PREFIX, CALCULATOR_CALL_SUFFIX,
]
"""Single tokens that stay visible in decoded text (like Qwen's `<tool_call>`)."""

MERGE_BUDGET = 320
"""Most BPE merges on top of the 256 byte tokens. Training stops earlier (about 200 merges) once
every fixed piece of task text is one token; this cap only bounds the vocabulary."""

CHAT_TEMPLATE = r"""
{#- Qwen2.5/Qwen3 layout with a shortened tool preamble. Deviation from Qwen: calls in the OpenAI
    `tool_calls` field render exactly like the text form metis keeps in assistant content,
    `<tool_call>{json}</tool_call>` with no newlines inside the tags, so both spellings of one
    conversation give the same tokens. `generation` marks what the assistant writes. -#}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is mapping and part.type == 'text' -%}{{- part.text -}}{%- endif -%}
        {%- endfor -%}
    {%- elif content is not none -%}
        {{- content -}}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\n' }}
    {%- endif %}
    {{- '<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + render_content(message.content) + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- render_content(message.content) }}
            {%- for tool_call in message.tool_calls or [] %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + render_content(message.content) + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""".strip()

_BUILT_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> Path:
    """Build a randomly initialised tiny Qwen3 + tokenizer folder at `out_dir` and return it.

    If `out_dir` already holds a built model it is returned untouched (the sizes are not checked).
    The folder is written next to `out_dir` and renamed into place, so a crash never leaves a
    half-written model behind.
    """
    def write(staging_dir: Path) -> None:
        if hidden_size % num_heads:
            raise ModelError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        tokenizer = build_tiny_tokenizer()
        tokenizer.save_pretrained(staging_dir)
        model = _random_qwen3(tokenizer, hidden_size, num_layers, num_heads, intermediate_size,
                              seed, max_position_embeddings)
        model.save_pretrained(staging_dir)

    return build_folder_atomically(Path(out_dir), _BUILT_MODEL_FILES, write)


def build_folder_atomically(out_dir: Path, required_files: tuple[str, ...], write) -> Path:
    """Run `write(staging_dir)` and rename the staging folder to `out_dir`; return `out_dir`.

    An `out_dir` that already holds `required_files` is returned untouched; one that holds other
    files is refused. A crash never leaves a half-written model behind.
    """
    if all((out_dir / name).is_file() for name in required_files):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(
            f"{out_dir} exists but is not a tiny model folder (missing one of "
            f"{', '.join(required_files)}); remove it or choose another model path"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging_dir.chmod(0o755)  # mkdtemp makes it private; the model folder should not be
    try:
        write(staging_dir)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory
        try:
            staging_dir.rename(out_dir)
        except OSError:
            if not all((out_dir / name).is_file() for name in required_files):
                raise  # otherwise another builder won the race: theirs is as good
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return out_dir


def build_tiny_tokenizer(*, training_texts: list[str] | None = None, special_tokens: list[str] = SPECIAL_TOKENS,
                         marker_tokens: list[str] = MARKER_TOKENS, chat_template: str = CHAT_TEMPLATE):
    """The tiny model's tokenizer (a transformers fast tokenizer with the chat template set).

    The defaults give the text task's tokenizer; model/tiny_vl.py passes its own texts (from
    `rendered_training_texts`), tokens and template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(byte_alphabet) + MERGE_BUDGET,
        min_frequency=2,
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    texts = _merge_training_texts() if training_texts is None else training_texts
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(special_tokens)
    backend.add_tokens(marker_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TURN_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=chat_template,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _merge_training_texts() -> list[str]:
    """The arithmetic task's conversations, rendered for merge training."""
    conversations = [row["messages"] for row in synthetic.cold_start_trajectories(200, seed=0)]
    conversations += [row["messages"] for row in synthetic.knowledge_examples(100, seed=0)]
    return rendered_training_texts(conversations, [synthetic.CALCULATOR_TOOL_SPEC], CHAT_TEMPLATE,
                                   SPECIAL_TOKENS + MARKER_TOKENS)


def rendered_training_texts(conversations: list[list[dict]], tools: list[dict], chat_template: str,
                            added_tokens: list[str]) -> list[str]:
    """`conversations` rendered with `chat_template`, with and without the tool listing, minus
    the added tokens.

    Rendering uses a plain byte tokenizer with the same template, so the merges see exactly the
    text the model will; the added tokens are cut out because they never reach the BPE model.
    """
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    plain = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    renderer = PreTrainedTokenizerFast(tokenizer_object=plain, chat_template=chat_template)
    added = re.compile("|".join(re.escape(t) for t in added_tokens))
    texts = []
    for messages in conversations:
        for tools_shown in (tools, None):  # a stage may render without the tool listing
            rendered = renderer.apply_chat_template(messages, tools=tools_shown, tokenize=False)
            texts.extend(piece for piece in added.split(rendered) if piece)
    return texts


def _random_qwen3(tokenizer, hidden_size, num_layers, num_heads, intermediate_size, seed,
                  max_position_embeddings):
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=end_of_turn_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=end_of_turn_id, pad_token_id=pad_id
    )
    return model
