"""matplotlib, imported on demand (it is an optional extra), and saving figures."""

from pathlib import Path
from typing import Union


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Raises:
        ValueError: when matplotlib is not installed, saying how to install it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError("plotting needs matplotlib: pip install matplotlib (or supra-lm[bench])") from error
    return plt


def save_figure(figure, path: Union[str, Path]) -> Path:
    """Saves ``figure`` to ``path`` (folders created) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    return path
