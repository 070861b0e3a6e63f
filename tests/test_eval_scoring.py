"""The log-likelihood scorer gives exact, checkable results on models whose preferences we set by hand."""

from __future__ import annotations

import math

import pytest

from care.eval import benchmarks as B
from care.eval.scoring import accuracy_summary, score_benchmark
from care.stats import wilson_ci


def test_wilson_ci_hand_computed():
    # 8/10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10), half-width from the Wilson formula.
    z = 1.959963984540054
    p, n = 0.8, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = wilson_ci(8, 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook value
    assert wilson_ci(0, 20)[0] == 0.0 and 0 < wilson_ci(0, 20)[1] < 0.2
    assert wilson_ci(0, 0) == (0.0, 0.0)


def test_accuracy_summary_per_subject():
    recs = [{"subject": "a", "correct": True}, {"subject": "a", "correct": False}, {"subject": "b", "correct": True}]
    s = accuracy_summary(recs)
    assert (s["correct"], s["n"]) == (2, 3) and s["accuracy"] == pytest.approx(2 / 3)
    assert s["subjects"]["a"]["accuracy"] == 0.5 and s["subjects"]["b"]["n"] == 1


@pytest.fixture(scope="module")
def biased_hf(tiny_llama):
    """tiny_llama whose output layer is replaced by a bias-only layer: logits are constant, set per test."""
    import torch

    from care.eval.backends import HFBackend

    backend = HFBackend(tiny_llama, "tiny", threads=1)
    cfg = backend.model.config
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    backend.model.lm_head = head
    return backend


def _prefer(backend, text: str, value: float) -> int:
    import torch

    (tok,) = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        backend.model.lm_head.bias.zero_()
        backend.model.lm_head.bias[tok] = value
    return tok


@pytest.mark.parametrize("bench, letter", [("medmcqa", "A"), ("medmcqa", "C"), ("pubmedqa", "B")])
def test_model_preferring_a_letter_scores_its_share(biased_hf, shared_data, bench, letter):
    items = B.load_benchmark(bench, shared_data, limit=40, seed=5)
    _prefer(biased_hf, f" {letter}", 8.0)
    res = score_benchmark(biased_hf, items)
    share = sum(it.answer_letter == letter for it in items) / len(items)
    assert 0 < share < 1  # the check below means something
    assert res["accuracy"] == share
    assert {r["pred"] for r in res["items"]} == {letter}
    assert [r["id"] for r in res["items"]] == [it.id for it in items]


def test_loglik_of_uniform_model_is_minus_n_log_vocab(biased_hf):
    """Zero logits: every token has log-prob -log V, so a continuation of n tokens scores exactly -n log V,
    on the single-token fast path and the multi-token path alike."""
    import torch

    with torch.no_grad():
        biased_hf.model.lm_head.bias.zero_()
    v = biased_hf.model.config.vocab_size
    conts = [" A", " maybe not", " otitis media with effusion"]
    lls = biased_hf.loglikelihoods("Question: x\nAnswer:", conts)
    ctx = biased_hf.encode("Question: x\nAnswer:")
    lens = [len(biased_hf.encode("Question: x\nAnswer:" + c)) - len(ctx) for c in conts]
    assert lens[0] == 1 and lens[2] > 2
    assert lls == pytest.approx([-n * math.log(v) for n in lens], rel=1e-6)


def test_long_context_is_cut_from_the_left(biased_hf):
    biased_hf.truncated = 0
    old = biased_hf.max_length
    biased_hf.max_length = 16
    try:
        lls = biased_hf.loglikelihoods("word " * 100 + "Answer:", [" A", " B"])
    finally:
        biased_hf.max_length = old
    assert biased_hf.truncated == 1 and len(lls) == 2


def _chain_rule(backend):
    """log P(' A B' | c) must equal log P(' A' | c) + log P(' B' | c + ' A') when tokens split the same way."""
    ctx = "The following are questions.\nQuestion: Which?\nAnswer:"
    whole = backend.encode(ctx + " A B")
    assert len(whole) - len(backend.encode(ctx)) == 2
    (both,) = backend.loglikelihoods(ctx, [" A B"])
    (first,) = backend.loglikelihoods(ctx, [" A"])
    (second,) = backend.loglikelihoods(ctx + " A", [" B"])
    return both, first + second


def test_hf_chain_rule(tiny_llama):
    from care.eval.backends import HFBackend

    both, parts = _chain_rule(HFBackend(tiny_llama, threads=1))
    assert both == pytest.approx(parts, abs=1e-4)


def test_gguf_scorer_chain_rule_and_determinism(embedded_gguf, shared_data):
    from care.eval.backends import GGUFBackend

    backend = GGUFBackend(embedded_gguf, n_ctx=1024, threads=1)
    try:
        both, parts = _chain_rule(backend)
        assert both == pytest.approx(parts, abs=2e-3)
        items = B.load_benchmark("mmlu_medical", shared_data, limit=4, seed=2)
        a = score_benchmark(backend, items)
        b = score_benchmark(backend, items)
        assert [r["loglik"] for r in a["items"]] == [r["loglik"] for r in b["items"]]
        assert a["n"] == 4 and backend.describe()["quant"] == "Q4_1"
    finally:
        backend.close()


def test_hf_generation_is_greedy_and_bounded(tiny_llama):
    from care.eval.backends import HFBackend
    from care.eval.generation import run_generation

    backend = HFBackend(tiny_llama, threads=1)
    pairs = [{"id": "1", "query": "Is fever serious?", "response": "Usually not.", "decision": "no"},
             {"id": "2", "query": "Do I need a doctor?", "response": "Maybe.", "decision": "maybe"}]
    a = run_generation(backend, pairs, max_tokens=6)
    b = run_generation(backend, pairs, max_tokens=6)
    assert [r["prediction"] for r in a["items"]] == [r["prediction"] for r in b["items"]]
    for r in a["items"]:
        assert len(backend.tokenizer(r["prediction"], add_special_tokens=False)["input_ids"]) <= 6 + 1
    assert a["n"] == 2 and set(a["rouge"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert a["decision"]["n"] == 2 and "bertscore" not in a
