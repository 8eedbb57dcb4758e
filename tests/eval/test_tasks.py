"""llm-foundry ICL files: format checks with file:line errors, and the lm-eval task YAMLs written."""

import json
from pathlib import Path

import pytest
import yaml

from supra.config import resolve_path

from supra.eval.tasks import KNOWN_TASKS, SHIPPED_DATA, read_icl_file, write_task_yamls


@pytest.mark.parametrize("fmt", ["multiple_choice", "schema", "language_modeling"])
def test_reads_each_format(tmp_path, write_jsonl, icl_records, fmt):
    records = icl_records[fmt]
    assert read_icl_file(write_jsonl(tmp_path / "t.jsonl", records)) == (fmt, records)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"query": "q", "choices": ["a", "b"], "gold": 0', r"t\.jsonl:3: not valid JSON"),
        ('{"query": "q", "choices": ["a", "b"]}', r"t\.jsonl:3: the record's keys \['choices', 'query'\] lack the multiple_choice keys"),
        ('{"query": "q", "choices": ["a", "b"], "gold": 2}', r"t\.jsonl:3: 'gold' must be an integer index in \[0, 2\); got 2"),
        ('{"query": "q", "choices": "ab", "gold": 0}', r"t\.jsonl:3: 'choices' must be a list of at least 2 strings"),
        ('{"context": "c", "continuation": "x"}', r"t\.jsonl:3: .* lack the multiple_choice keys"),
        ("", r"t\.jsonl:3: empty line"),
        ("[1, 2]", r"t\.jsonl:3: expected a JSON object, got a list"),
    ],
)
def test_a_malformed_line_is_named_with_its_number(tmp_path, icl_records, bad_line, message):
    good = [json.dumps(r) for r in icl_records["multiple_choice"]]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(good[:2] + [bad_line] + good[2:]) + "\n")
    with pytest.raises(ValueError, match=message):
        read_icl_file(path)


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_icl_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_icl_file(tmp_path / "empty.jsonl")
    (tmp_path / "no_files").mkdir()
    with pytest.raises(ValueError, match="holds no .jsonl files"):
        write_task_yamls(tmp_path / "no_files", tmp_path / "out")


def test_task_yamls_follow_llm_foundry_prompts(icl_dir, tmp_path):
    written = write_task_yamls(icl_dir, tmp_path / "tasks")
    assert sorted(written) == ["local_arc_easy", "local_lm_mini", "local_schema_mini"]
    arc = yaml.safe_load(written["local_arc_easy"].read_text())
    # ARC's delimiter "\nAnswer: ": the text ends at "Answer:", the space starts the continuation.
    assert arc["doc_to_text"] == "{{query.strip()}}\nAnswer:" and arc["target_delimiter"] == " "
    assert [m["metric"] for m in arc["metric_list"]] == ["acc", "acc_norm"]
    assert arc["dataset_kwargs"]["data_files"]["train"] == str((icl_dir / "arc_easy.jsonl").resolve())
    schema = yaml.safe_load(written["local_schema_mini"].read_text())
    assert schema["doc_to_text"] == "gold" and [m["metric"] for m in schema["metric_list"]] == ["acc"]
    lm = yaml.safe_load(written["local_lm_mini"].read_text())
    assert lm["output_type"] == "loglikelihood" and lm["doc_to_target"] == " {{continuation.strip()}}"
    assert all(yaml.safe_load(p.read_text())["tag"] == ["local_icl"] for p in written.values())


def test_a_known_file_in_the_wrong_format_is_rejected(tmp_path, write_jsonl, icl_records):
    write_jsonl(tmp_path / "piqa.jsonl", icl_records["schema"])
    with pytest.raises(ValueError, match="piqa.jsonl is in the schema format, but piqa tasks are multiple_choice"):
        write_task_yamls(tmp_path / "piqa.jsonl", tmp_path / "out")


def test_the_shipped_reference_files_are_all_valid_and_in_their_known_formats(tmp_path):
    written = write_task_yamls(SHIPPED_DATA, tmp_path)
    assert set(written) >= {f"local_{name}" for name in KNOWN_TASKS}
    # The README's counts are the files' line counts (an independent record of what ships).
    readme = (resolve_path(SHIPPED_DATA) / "README.md").read_text()
    for name in KNOWN_TASKS:
        lines = sum(1 for _ in open(resolve_path(SHIPPED_DATA) / f"{name}.jsonl"))
        assert f"| {name}.jsonl |" in readme and f"| {lines} |" in readme
