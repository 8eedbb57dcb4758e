"""`python -m supra.eval --model supra` and lm-eval's own `hf` model score the same model the same:
SmolLM2-135M (the real GGUF file; transformers reads it with its own GGUF loader for the `hf`
model) on the first 50 PIQA examples shipped with supra, acc and acc_norm, and each request's
log-likelihood."""

import json

import pytest

from supra.eval.__main__ import main as lm_eval_main
from supra.eval.tasks import SHIPPED_DATA

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")


def _run(tmp_path, name, model, model_args):
    out = tmp_path / name
    lm_eval_main([
        "--model", model, "--model_args", model_args, "--local_data", f"{SHIPPED_DATA}/piqa.jsonl",
        "--tasks", "local_piqa", "--limit", "50", "--batch_size", "8", "--device", "cpu",
        "--output_path", str(out), "--log_samples",
    ])
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob("samples_local_piqa_*.jsonl")
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(results.read_text())["results"]["local_piqa"], records


def test_piqa_scores_equal_lm_evals_hf_model_on_smollm2(tmp_path):
    from supra.hub import download

    path = download("smollm2-135m")
    ours, our_samples = _run(tmp_path, "supra", "supra", f"checkpoint={path},dtype=fp32")
    theirs, their_samples = _run(tmp_path, "hf", "hf", f"pretrained={path.parent},gguf_file={path.name},dtype=float32")
    assert (ours["acc,none"], ours["acc_norm,none"]) == (theirs["acc,none"], theirs["acc_norm,none"])
    by_doc = {record["doc_id"]: record for record in their_samples}
    for record in our_samples:
        # Samples files store each response's (log-likelihood, is_greedy) as strings.
        expected = [float(response[0][0]) for response in by_doc[record["doc_id"]]["resps"]]
        assert [float(response[0][0]) for response in record["resps"]] == pytest.approx(expected, rel=1e-4, abs=1e-3)
