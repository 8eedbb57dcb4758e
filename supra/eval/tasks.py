"""Local evaluation tasks from llm-foundry in-context-learning files, as lm-eval task YAMLs.

TRI-ML/linear_open_lm evaluated with llm-foundry's ``local_data`` JSONL files. Each line is one
example in one of three formats:

- ``multiple_choice``: ``{"query": str, "choices": [str, ...], "gold": int}``; the query is the
  context and each choice is a scored continuation (ARC, BoolQ, COPA, PIQA).
- ``schema``: ``{"context_options": [str, ...], "continuation": str, "gold": int}``; each option
  is a context and the shared continuation is scored after each (WinoGrande, Winograd WSC).
- ``language_modeling``: ``{"context": str, "continuation": str}``; correct when greedy decoding
  reproduces the continuation exactly (LAMBADA).

``write_task_yamls`` checks such files and writes one lm-eval task YAML per file (``dataset_path:
json`` with local ``data_files``, so ``HF_DATASETS_OFFLINE=1`` runs work), named ``local_<stem>``
and tagged ``local_icl``. Multiple choice reports ``acc`` and ``acc_norm`` (log-likelihood divided
by the choice's length in characters, lm-eval's rule); schema reports ``acc`` only, since every
option scores the same continuation, so length normalization cannot change the choice; language
modeling reports ``acc`` (exact greedy match) and the continuation's ``perplexity``.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import yaml

from supra.config import resolve_path

# The eight llm-foundry ICL files shipped with supra (see their README for sources and licenses).
SHIPPED_DATA = "supra:assets/eval_data"

PathLike = Union[str, Path]

TASK_PREFIX = "local_"
TAG = "local_icl"
FORMAT_KEYS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


@dataclass(frozen=True)
class LocalTask:
    """How one llm-foundry file is prompted.

    Args:
        format (str): one of ``FORMAT_KEYS``.
        delimiter (str): put between the context and the scored continuation (llm-foundry's
            ``continuation_delimiter``, after stripping the fields as llm-foundry does).
    """

    format: str
    delimiter: str = " "


# The prompt settings of llm-foundry's task list for these files: ARC, BoolQ and PIQA put
# "\nAnswer: " between question and answer; the others a single space.
KNOWN_TASKS = {
    "arc_easy": LocalTask("multiple_choice", "\nAnswer: "),
    "arc_challenge": LocalTask("multiple_choice", "\nAnswer: "),
    "boolq": LocalTask("multiple_choice", "\nAnswer: "),
    "piqa": LocalTask("multiple_choice", "\nAnswer: "),
    "copa": LocalTask("multiple_choice"),
    "winogrande": LocalTask("schema"),
    "winograd_wsc": LocalTask("schema"),
    "lambada_openai": LocalTask("language_modeling"),
}


def _format_of(record: Dict[str, Any]) -> Optional[str]:
    for name, keys in FORMAT_KEYS.items():
        if all(key in record for key in keys):
            return name
    return None


def _check_record(record: Any, fmt: Optional[str], where: str) -> str:
    """The record's format; raises ValueError naming ``where`` (file:line) and what is wrong."""
    expected = "; ".join(f"{name}: {list(keys)}" for name, keys in FORMAT_KEYS.items())
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got a {type(record).__name__}; the formats are {expected}")
    found = _format_of(record)
    if found is None or (fmt is not None and found != fmt):
        want = f"the {fmt} keys {list(FORMAT_KEYS[fmt])}" if fmt else f"the keys of one format ({expected})"
        raise ValueError(f"{where}: the record's keys {sorted(record)} lack {want}; fix or remove the line")
    options = record.get("choices", record.get("context_options"))
    if found != "language_modeling":
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            key = "choices" if found == "multiple_choice" else "context_options"
            raise ValueError(f"{where}: {key!r} must be a list of at least 2 strings; got {options!r}")
        gold = record["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise ValueError(f"{where}: 'gold' must be an integer index in [0, {len(options)}); got {gold!r}")
    text_keys = {"multiple_choice": ["query"], "schema": ["continuation"], "language_modeling": ["context", "continuation"]}
    for key in text_keys[found]:
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string; got a {type(record[key]).__name__}")
    return found


def read_icl_file(path: PathLike) -> Tuple[str, List[Dict[str, Any]]]:
    """Reads and checks an llm-foundry ICL JSONL file.

    Args:
        path: the ``.jsonl`` file; its first record decides the format, every line must follow it.

    Returns:
        Tuple[str, List[dict]]: the format name and the records.

    Raises:
        ValueError: for a missing or empty file, a line that is not JSON, a record of another
            format or with missing keys, or a ``gold`` outside the options, naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist; pass a .jsonl file in an llm-foundry ICL format")
    fmt, records = None, []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                raise ValueError(f"{path}:{number}: empty line; JSONL task files need one JSON record per line")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error}); fix or remove the line") from error
            fmt = _check_record(record, fmt, f"{path}:{number}")
            records.append(record)
    if not records:
        raise ValueError(f"task file {path} is empty; it needs at least one record")
    return fmt, records


def _split_delimiter(delimiter: str) -> Tuple[str, str]:
    """(text suffix, lm-eval target_delimiter): trailing spaces go before the continuation."""
    stripped = delimiter.rstrip(" ")
    return stripped, delimiter[len(stripped):]


def task_config(name: str, data_file: PathLike, task: LocalTask) -> Dict[str, Any]:
    """The lm-eval task config (a YAML-ready dict) for one llm-foundry file.

    Fields are stripped first, as llm-foundry does, then joined by the task's delimiter.

    Args:
        name (str): the lm-eval task name.
        data_file: the JSONL file (made absolute: lm-eval resolves relative paths from the cwd).
        task (LocalTask): its format and delimiter.
    """
    suffix, target_delimiter = _split_delimiter(task.delimiter)
    config = {
        "task": name,
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(Path(data_file).resolve())}},
        "test_split": "train",
        "fewshot_split": "train",
        "target_delimiter": target_delimiter,
        "metadata": {"version": 1.0, "source": "llm-foundry ICL file", "format": task.format},
    }
    mean = {"aggregation": "mean", "higher_is_better": True}
    if task.format == "multiple_choice":
        config.update(
            output_type="multiple_choice", doc_to_text="{{query.strip()}}" + suffix,
            doc_to_choice="{{choices | map('trim') | list}}",
            doc_to_target="gold", metric_list=[{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}],
        )
    elif task.format == "schema":
        # doc_to_text returning the gold index (an int) is lm-eval's "multiple inputs" mode: the
        # options become the contexts and doc_to_target the shared continuation.
        config.update(
            output_type="multiple_choice", doc_to_text="gold",
            doc_to_choice="{{context_options | map('trim') | list}}",
            doc_to_target="{{continuation.strip()}}", metric_list=[{"metric": "acc", **mean}],
        )
    else:
        # lm-eval puts no target_delimiter before a loglikelihood target: it goes in the target.
        config.update(
            output_type="loglikelihood", doc_to_text="{{context.strip()}}" + suffix,
            doc_to_target=target_delimiter + "{{continuation.strip()}}", target_delimiter="",
            metric_list=[{"metric": "acc", **mean}, {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
        )
    return config


def _data_files(data: Union[PathLike, List[PathLike]]) -> Iterator[Path]:
    items = data if isinstance(data, (list, tuple)) else [data]
    for item in items:
        path = resolve_path(item)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise ValueError(f"local task folder {path} holds no .jsonl files in an llm-foundry ICL format")
            yield from found
        elif path.suffix == ".jsonl" and path.is_file():
            yield path
        else:
            raise ValueError(f"local task data {path} is neither a folder of .jsonl files nor a .jsonl file")


def write_task_yamls(data: Union[PathLike, List[PathLike]], out_dir: PathLike) -> Dict[str, Path]:
    """Checks llm-foundry ICL files and writes one lm-eval task YAML per file.

    Files named like the reference's (``arc_easy.jsonl``, ``piqa.jsonl``, ... see ``KNOWN_TASKS``)
    get its prompt delimiters; any other ``.jsonl`` is recognized by its keys and joined by a space.

    Args:
        data: a folder of ``.jsonl`` files, one file, or a list of either (``supra:`` paths name
            files shipped with supra: ``SHIPPED_DATA`` is the eight reference files).
        out_dir: where the YAMLs go (created); pass it to lm-eval as ``include_path``.

    Returns:
        Dict[str, Path]: task name (``local_<file stem>``) -> YAML file.

    Raises:
        ValueError: for a missing path, a folder without ``.jsonl`` files, or a malformed file
            (naming the file and line), or a known file in the wrong format.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for data_file in _data_files(data):
        fmt, _ = read_icl_file(data_file)
        task = KNOWN_TASKS.get(data_file.stem, LocalTask(fmt))
        if task.format != fmt:
            raise ValueError(f"{data_file} is in the {fmt} format, but {data_file.stem} tasks are {task.format}")
        name = TASK_PREFIX + data_file.stem
        target = out_dir / f"{name}.yaml"
        target.write_text(yaml.safe_dump(task_config(name, data_file, task), sort_keys=False, allow_unicode=True))
        written[name] = target
    return written
