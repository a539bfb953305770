"""benchmarks/direct_answers.py: the direct-answer sureness behind the README's issue-18 analysis."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

torch = pytest.importorskip("torch")


def _probe():
    spec = importlib.util.spec_from_file_location("direct_answers", REPO / "benchmarks" / "direct_answers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_p_direct_is_the_product_of_next_token_probabilities(tiny_model_dir, tiny_tokenizer):
    """Each figure equals the chain of next-token probabilities taken one prefix at a time (no
    shared forward pass), and p_tool_first is the first token's probability of `<tool_call>`."""
    from transformers import AutoModelForCausalLM

    from metis_cli.data.chat import encode_text, prompt_ids
    from metis_cli.data.synthetic import CALCULATOR_TOOL_SPEC, SYSTEM_PROMPT

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    figures = _probe().direct_answer_figures(model, tiny_tokenizer)
    assert len(figures) == 100 and {f["question"] for f in figures} == {
        f"What is {a} + {b}?" for a in range(10) for b in range(10)}
    for figure in (figures[0], figures[68], figures[99]):  # 0 + 0, 6 + 8, 9 + 9
        prompt = prompt_ids(tiny_tokenizer, [{"role": "system", "content": SYSTEM_PROMPT},
                                             {"role": "user", "content": figure["question"]}], [CALCULATOR_TOOL_SPEC])
        ids = prompt + encode_text(tiny_tokenizer, "<answer>")
        p = 1.0
        for token in encode_text(tiny_tokenizer, f"{figure['answer']}</answer>"):
            with torch.no_grad():
                p *= model(torch.tensor([ids])).logits[0, -1].softmax(-1)[token].item()
            ids.append(token)
        assert figure["p_direct"] == pytest.approx(p, rel=1e-4)
        with torch.no_grad():
            first = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        assert figure["p_tool_first"] == pytest.approx(first[encode_text(tiny_tokenizer, "<tool_call>")[0]].item(),
                                                       rel=1e-4)
    assert figures[68]["answer"] == "14"


def test_cli_prints_and_writes_every_sum(tiny_model_dir, tmp_path):
    out = tmp_path / "direct.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "direct_answers.py"), str(tiny_model_dir),
                          "--json", str(out), "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "p_direct mean" in run.stdout
    result = json.loads(out.read_text())[str(tiny_model_dir)]
    assert len(result["sums"]) == 100
    assert result["summary"]["p_direct_min"] == min(s["p_direct"] for s in result["sums"])
