"""``python -m supra.eval``: the ``lm_eval`` command with model ``supra`` registered.

    python -m supra.eval --model supra --model_args checkpoint=PATH,dtype=bf16 --tasks hellaswag,piqa
    python -m supra.eval --model supra --model_args checkpoint=PATH --local_data supra:assets/eval_data \\
        --tasks local_icl

Every ``lm_eval`` option works unchanged. One is added: ``--local_data DIR_OR_FILE`` turns
llm-foundry ICL JSONL files into lm-eval tasks named ``local_<file stem>`` (tag ``local_icl``), written
to a temporary folder passed as ``--include_path``. lm-eval 0.4.x reads no plugin entry points, so
the bare ``lm_eval`` command cannot see model ``supra``; this module is that command plus it.
"""

import sys
import tempfile
from typing import List, Optional, Tuple


def _pop_option(argv: List[str], flag: str) -> Tuple[List[str], Optional[str]]:
    """Removes ``flag VALUE`` or ``flag=VALUE`` from ``argv``; returns (the rest, VALUE or None)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        if argv[i] == flag:
            if i + 1 >= len(argv):
                raise SystemExit(f"python -m supra.eval: {flag} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith(flag + "="):
            value = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return rest, value


def main(argv: Optional[List[str]] = None) -> None:
    """Registers ``supra``, expands ``--local_data``, and runs lm-eval's command line."""
    try:
        import supra.eval.harness  # noqa: F401  (registers the model)
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError as error:
        raise SystemExit(f"python -m supra.eval needs lm-eval 0.4.x ({error}): pip install 'supra-lm[eval]'") from error

    from supra.eval.tasks import write_task_yamls

    argv, local_data = _pop_option(list(sys.argv[1:] if argv is None else argv), "--local_data")
    if local_data is not None:
        if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            raise SystemExit(
                "python -m supra.eval: --local_data writes its tasks to a folder it passes as --include_path; "
                "give one of the two, or write the tasks into your folder with supra.eval.tasks.write_task_yamls"
            )
        folder = tempfile.mkdtemp(prefix="supra_local_tasks_")
        try:
            names = write_task_yamls(local_data.split(","), folder)
        except ValueError as error:
            raise SystemExit(f"python -m supra.eval: {error}") from error
        print(f"local tasks from {local_data}: {', '.join(names)} (tag local_icl)", file=sys.stderr)
        argv += ["--include_path", folder]
    sys.argv = ["lm-eval", *argv]
    setup_logging()
    cli = HarnessCLI()
    cli.execute(cli.parse_args())


if __name__ == "__main__":
    main()
