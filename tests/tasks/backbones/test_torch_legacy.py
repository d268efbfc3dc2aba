"""The PyTorch-free legacy .pth reader, on files written here with the stdlib pickle module."""

from __future__ import annotations

import os
import pickle
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tasks.backbones.torch_legacy import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    load_legacy_state_dict,
)

SYS_INFO = {
    "protocol_version": 1001,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}


@dataclass
class _Storage:
    """A storage to write: pickled as a persistent id, its bytes appended after the pickles."""

    storage_class: type
    key: str
    data: np.ndarray


@dataclass
class _Tensor:
    """A view into a storage; pickles as torch._utils._rebuild_tensor_v2(...) like torch does."""

    rebuild: object
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __reduce__(self) -> tuple:
        args = (self.storage, self.offset, self.size, self.stride, False, OrderedDict())
        return self.rebuild, args


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_class, obj.key, "cpu", obj.data.size, None)
        return None


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Importable stand-ins, so pickle writes the same global names torch.save writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args: object) -> None:
        raise AssertionError("only used to name the global when writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _write_header(file) -> None:
    for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, SYS_INFO):
        pickle.dump(header, file, protocol=2)


def write_legacy(path: Path, state: OrderedDict, storages: list[_Storage]) -> Path:
    """Reproduce torch.save's legacy layout: headers, state, key list, then raw storages."""
    with open(path, "wb") as file:
        _write_header(file)
        _LegacyPickler(file, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], file, protocol=2)
        for storage in storages:
            file.write(storage.data.size.to_bytes(8, "little", signed=True))
            file.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())
    return path


def test_reads_contiguous_offset_and_transposed_views(fake_torch, tmp_path: Path) -> None:
    rebuild = fake_torch._utils._rebuild_tensor_v2
    floats = _Storage(fake_torch.FloatStorage, "140001", np.arange(24, dtype=np.float32))
    longs = _Storage(fake_torch.LongStorage, "140002", np.array([7], dtype=np.int64))
    state = OrderedDict(
        [
            ("conv.weight", _Tensor(rebuild, floats, 0, (2, 3, 4), (12, 4, 1))),
            ("view.t", _Tensor(rebuild, floats, 5, (3, 2), (1, 6))),
            ("bn.num_batches_tracked", _Tensor(rebuild, longs, 0, (), ())),
        ]
    )
    path = write_legacy(tmp_path / "model.pth", state, [floats, longs])

    tensors = load_legacy_state_dict(path)

    assert list(tensors) == ["conv.weight", "view.t", "bn.num_batches_tracked"]
    np.testing.assert_array_equal(tensors["conv.weight"], np.arange(24).reshape(2, 3, 4))
    expected_view = 5 + np.arange(3)[:, None] + 6 * np.arange(2)[None, :]
    np.testing.assert_array_equal(tensors["view.t"], expected_view)
    assert tensors["view.t"].dtype == np.float32 and tensors["view.t"].flags.c_contiguous
    assert tensors["view.t"].flags.writeable and tensors["view.t"].base is None
    assert tensors["bn.num_batches_tracked"].dtype == np.int64
    assert tensors["bn.num_batches_tracked"].shape == () and tensors["bn.num_batches_tracked"] == 7


def test_view_outside_its_storage_is_refused(fake_torch, tmp_path: Path) -> None:
    floats = _Storage(fake_torch.FloatStorage, "1", np.zeros(6, dtype=np.float32))
    state = OrderedDict(w=_Tensor(fake_torch._utils._rebuild_tensor_v2, floats, 2, (3, 2), (2, 1)))
    path = write_legacy(tmp_path / "bad.pth", state, [floats])
    with pytest.raises(ValueError, match="outside its storage"):
        load_legacy_state_dict(path)


class _Exploit:
    """Pickles as a call to os.makedirs: loading it with plain pickle would create `target`."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.makedirs, (str(self.target),)


@pytest.mark.parametrize("position", ["header", "state"])
def test_malicious_pickle_is_refused(tmp_path: Path, position: str) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as file:
        if position == "state":
            _write_header(file)
        pickle.dump(_Exploit(target), file, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_legacy_state_dict(path)
    assert not target.exists()


def test_zip_format_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "new.pth"
    path.write_bytes(b"PK\x03\x04rest-of-a-zip")
    with pytest.raises(ValueError, match="zip-format"):
        load_legacy_state_dict(path)
