"""Running lm-eval tasks on a ``SupraLM``: task lookup with clear errors, the table, the JSON."""

import difflib
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from supra.eval.tasks import TASK_PREFIX, write_task_yamls

PathLike = Union[str, Path]
logger = logging.getLogger(__name__)


def _unknown(tasks: Sequence[str], manager: TaskManager) -> List[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known and not Path(t).is_file()]


def prepare_tasks(
    tasks: Sequence[str],
    *,
    local_data: Optional[Union[PathLike, Sequence[PathLike]]] = None,
    include_path: Optional[PathLike] = None,
    work_dir: PathLike,
) -> TaskManager:
    """Writes the local tasks and returns a ``TaskManager`` that knows every name in ``tasks``.

    The harness's own task index (thousands of YAMLs, seconds to read) is loaded only when a
    name is not a local or ``include_path`` task.

    Args:
        tasks: task, group or tag names (or task YAML paths).
        local_data: llm-foundry ICL JSONL files or folders, as tasks ``local_<stem>``.
        include_path: a folder of extra lm-eval task YAMLs.
        work_dir: where the local task YAMLs are written (a ``tasks`` folder inside).

    Raises:
        ValueError: for no tasks, a malformed local file (naming file and line), or task names
            neither lm-eval nor the local files know (with the closest known names).
    """
    if not tasks:
        raise ValueError("no tasks given: set tasks=[...] (lm-eval task names, or local_<stem> with local_data=)")
    paths = []
    if local_data is not None:
        folder = Path(work_dir) / "tasks"
        write_task_yamls(list(local_data) if isinstance(local_data, (list, tuple)) else local_data, folder)
        paths.append(str(folder))
    if include_path is not None:
        paths.append(str(include_path))
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    missing = _unknown(tasks, manager)
    if not missing:
        return manager
    # A local_ name can only come from local_data: no need to read the harness's index for it.
    if not any(name.startswith(TASK_PREFIX) for name in missing):
        manager = TaskManager(include_path=paths or None)
        missing = _unknown(tasks, manager)
    if missing:
        hints = {name: difflib.get_close_matches(name, manager.all_tasks, n=3) for name in missing}
        detail = "; ".join(f"{name!r} (closest: {close})" if close else repr(name) for name, close in hints.items())
        raise ValueError(
            f"unknown task(s): {detail}. Names are lm-eval tasks, groups or tags (`lm_eval ls tasks`), or local_<file stem> "
            "for the llm-foundry files given as local_data="
        )
    return manager


def _shot_groups(tasks: Sequence[str], num_fewshot: Union[None, int, Mapping[str, int]]) -> Dict[Optional[int], List[str]]:
    """Tasks grouped by few-shot count (None: each task's own default)."""
    if not isinstance(num_fewshot, Mapping):
        return {num_fewshot: list(tasks)}
    unused = sorted(set(num_fewshot) - set(tasks))
    if unused:
        logger.warning("num_fewshot counts for %s are unused: those tasks are not in %s", unused, list(tasks))
    groups: Dict[Optional[int], List[str]] = {}
    for task in tasks:
        groups.setdefault(num_fewshot.get(task), []).append(task)
    return groups


def _merge(into: Dict[str, Any], results: Dict[str, Any]) -> Dict[str, Any]:
    if not into:
        return results
    for key, value in results.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
    return into


def run_harness(
    lm: Any,
    tasks: Sequence[str],
    manager: TaskManager,
    *,
    num_fewshot: Union[None, int, Mapping[str, int]] = None,
    limit: Optional[Union[int, float]] = None,
    log_samples: bool = False,
    seed: int = 0,
    bootstrap_iters: int = 1000,
) -> Dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``lm`` (a ``SupraLM``); returns lm-eval's results dict.

    Args:
        num_fewshot: one count for every task, None for each task's default, or a mapping
            ``{task: count}`` (the paper's table: ``{"mmlu": 5}``, the rest their default of 0),
            run as one harness call per count and merged into one results dict; counts for
            tasks not in ``tasks`` are logged and ignored (so a config's mapping survives a
            ``tasks=`` override).
        bootstrap_iters: only sets the standard errors of metrics without a closed form (e.g.
            perplexity); lm-eval's default of 100000 takes minutes on large tasks.
    """
    merged: Dict[str, Any] = {}
    for shots, group in _shot_groups(tasks, num_fewshot).items():
        results = simple_evaluate(
            model=lm, tasks=group, task_manager=manager, num_fewshot=shots, limit=limit, log_samples=log_samples,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters,
        )
        merged = _merge(merged, results)
    return merged


def harness_table(results: Dict[str, Any]) -> str:
    """lm-eval's own markdown table(s): tasks, then groups when there are any."""
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_harness_json(results: Dict[str, Any], path: PathLike) -> Path:
    """lm-eval's results (samples, if logged, in a ``samples`` key) as JSON, as its CLI writes them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return path
