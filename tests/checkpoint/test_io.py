"""Weight-file reading: pages of a memory-mapped pickle handed back tensor by tensor."""

import sys

import pytest
import torch

from supra.checkpoint._io import iter_tensors, release_file_pages


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps; pages are released on Linux only")
def test_transient_pickle_tensors_keep_their_values_and_free_their_pages(tmp_path):
    expected = {f"w{i}": torch.randn(512, 512, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(expected, path)
    peak = 0
    for name, tensor in iter_tensors(path, transient=True):
        # What a converting caller does: read every value once into a tensor of its own.
        copy = tensor.to(torch.float64)
        assert torch.equal(copy, expected[name].to(torch.float64))
        peak = max(peak, _resident_kib(path))
    one_tensor_kib = 512 * 512 * 4 // 1024
    # Without the release every tensor read so far stays resident (4 x 1 MiB here).
    assert peak <= 2 * one_tensor_kib + 64


def test_a_released_tensor_reads_back_from_the_file(tmp_path):
    expected = torch.arange(300_000, dtype=torch.float32)
    torch.save({"w": expected}, tmp_path / "w.bin")
    loaded = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)["w"]
    assert torch.equal(loaded, expected)
    release_file_pages(loaded)
    assert torch.equal(loaded, expected)


def test_tensors_sharing_a_storage_in_an_unmappable_pickle_survive_a_transient_read(tmp_path):
    # The legacy format loads into anonymous memory: releasing its pages would zero the tie.
    weight = torch.randn(1024, 256)
    torch.save({"a": weight, "b": weight}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    seen = {name: tensor.clone() for name, tensor in iter_tensors(tmp_path / "old.bin", transient=True)}
    assert torch.equal(seen["a"], weight) and torch.equal(seen["b"], weight)


def test_tensors_sharing_a_storage_in_a_mapped_pickle_survive_a_transient_read(tmp_path):
    weight = torch.randn(1024, 256)
    torch.save({"a": weight, "b": weight}, tmp_path / "tied.bin")
    seen = {name: tensor.clone() for name, tensor in iter_tensors(tmp_path / "tied.bin", transient=True)}
    assert torch.equal(seen["a"], weight) and torch.equal(seen["b"], weight)
