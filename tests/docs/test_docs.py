"""README.md and every guide in docs/: each Python and shell block runs as a user would run it.

A guide runs in a scratch folder of its own, its blocks in order, so a block may use what an
earlier block of the same guide wrote (a checkpoint, a corpus). Python blocks share one namespace
and run in this process; shell blocks run in bash with this interpreter's environment first on
PATH (``supra``, ``python``, ``tune``). Paths under ``/tmp/`` in a block are redirected into the
scratch folder, so that runs never meet, and the repository's ``benchmarks/`` is linked into it,
as blocks run those scripts from the root of a clone. Fences tagged ``python`` or ``bash`` are code; the others
(program output, ``text``, ``yaml``, ``json``, ``diff``) are not run.

Markers are HTML comments on the lines just before a block (invisible on the rendered page):

- ``<!-- docs-test: skip (needs a GPU) -->``: the block is not run. The reason says why, and the
  text beside the block tells the reader the same.
- ``<!-- docs-test: replace "OLD" "NEW" -->``: the block runs with OLD replaced by NEW, e.g. fewer
  training steps than a user would run; several may stack.
- ``<!-- docs-test: every block: replace "OLD" "NEW" -->``, anywhere in a guide: the same for
  every block of that guide.

docs/huggingface.md loads ``tri-ml/mistral-supra`` from the hub; a tiny openlm checkpoint with a
tokenizer, written in the scratch folder at that relative path, stands in for it (transformers and
``supra.hf`` read a local folder of that name first).
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE = {"python", "bash"}
# Guides whose blocks train, evaluate or convert real-sized models (minutes, not seconds).
SLOW = {"docs/uptraining.md", "docs/generation.md", "docs/evaluation.md", "docs/checkpoints.md"}
HUB_ID = "tri-ml/mistral-supra"

FENCE = re.compile(r"^( *)```(\S*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->", re.DOTALL)


@dataclass
class Block:
    language: str
    code: str
    line: int
    skip: Optional[str] = None
    replacements: List[Tuple[str, str]] = field(default_factory=list)


def _replacement(directive: str, where: str) -> Tuple[str, str]:
    words = shlex.split(directive)
    if len(words) != 3 or words[0] != "replace":
        raise ValueError(f'{where}: unknown docs-test marker {directive!r}; use skip (REASON) or replace "OLD" "NEW"')
    return words[1], words[2]


def parse(path: Path) -> List[Block]:
    """The fenced blocks of ``path`` with their markers.

    Raises:
        ValueError: for an unknown marker, a skip without a reason, or a replacement whose text is
            not in its block (a stale marker).
    """
    text = path.read_text()
    name = path.relative_to(ROOT).as_posix()
    every = [_replacement(m.group(1)[len("every block:"):], name)
             for m in MARKER.finditer(text) if m.group(1).startswith("every block:")]
    blocks = []
    for fence in FENCE.finditer(text):
        line = text.count("\n", 0, fence.start()) + 1
        indent = len(fence.group(1))
        code = "".join(row[indent:] + "\n" for row in fence.group(3).splitlines())
        block = Block(fence.group(2), code, line, replacements=[r for r in every if r[0] in code])
        above = text[: fence.start()].rstrip().splitlines()
        while above and MARKER.fullmatch(above[-1].strip()):
            directive = MARKER.fullmatch(above.pop().strip()).group(1)
            where = f"{name}:{line}"
            if directive.startswith("every block:"):
                continue
            if directive.startswith("skip"):
                block.skip = directive[len("skip"):].strip(" ()")
                if not block.skip:
                    raise ValueError(f"{where}: a skipped block needs a reason: skip (needs a GPU)")
            else:
                old, new = _replacement(directive, where)
                if old not in code:
                    raise ValueError(f"{where}: {old!r} is not in the block it should replace")
                block.replacements.append((old, new))
        blocks.append(block)
    return blocks


def _guides():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        name = path.relative_to(ROOT).as_posix()
        if any(block.language in CODE and not block.skip for block in parse(path)):
            yield pytest.param(path, id=name, marks=[pytest.mark.slow] if name in SLOW else [])


def _stand_in_for_the_hub(folder: Path) -> None:
    """A tiny openlm checkpoint with a tokenizer at ``folder / HUB_ID``, from the tests/hf helpers."""
    sys.path.insert(0, str(ROOT / "tests" / "hf"))
    try:
        import hf_tiny
    finally:
        sys.path.remove(str(ROOT / "tests" / "hf"))
    model_folder, _, _ = hf_tiny.write_openlm_folder(folder / HUB_ID)
    hf_tiny.write_tokenizer(model_folder)


def test_markers_parse_and_code_blocks_are_tagged_python_or_bash():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in parse(path):
            if block.language in ("sh", "shell", "console", "py"):
                raise AssertionError(f"{path.name}:{block.line}: tag code blocks python or bash (they run)")


def test_the_hf_quickstart_is_the_reference_line_for_line():
    blocks = parse(ROOT / "docs" / "huggingface.md")
    diff = next(block for block in blocks if block.language == "diff").code.splitlines()
    supra_lines = [line[1:] for line in diff if not line.startswith("-")]
    assert [line for line in diff if line.startswith("-")] == ["-from open_lm.open_lm_hf import *"]
    quickstart = next(block for block in blocks if block.language == "python").code.splitlines()
    assert quickstart[: len(supra_lines)] == supra_lines


@pytest.mark.parametrize("guide", list(_guides()))
def test_every_block_of_the_guide_runs(guide, tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    if guide.name == "huggingface.md":
        _stand_in_for_the_hub(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # Blocks that need the hub are marked; the others must not reach for it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in parse(guide):
        if block.language not in CODE or block.skip:
            continue
        code = block.code
        for old, new in block.replacements:
            code = code.replace(old, new)
        code = code.replace("/tmp/", f"{tmp_path}/tmp/")
        name = str(guide.relative_to(ROOT))
        if block.language == "python":
            # Blank lines first, so that tracebacks give the guide's own line numbers.
            exec(compile("\n" * block.line + code, name, "exec"), namespace)
            continue
        run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"{name}:{block.line} failed:\n{code}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
