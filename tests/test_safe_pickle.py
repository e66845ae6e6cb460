"""Pickles cmscale did not write (cmscale.safe_pickle, read by models.edm_pickle and the CIFAR-10
reader in data.datasets): no code runs from them, and no small file makes a reader hang or blow up
(billion laughs, a list that contains itself, a memo bomb, deep nesting). Each ends quickly in one
error naming the file."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
from click.testing import CliRunner

from cmscale.cli.main import main
from cmscale.data.archive import DataFormatError
from cmscale.data.datasets import load_cifar10
from cmscale.models.edm_pickle import EDMPickleError, read_edm_pickle


def billion_laughs(levels: int = 98) -> bytes:
    """Each list holds the one before twice: 9 bytes a level, 2**levels nodes to walk."""
    data = b"\x80\x02]q\x00"
    for level in range(1, levels + 1):
        data += b"]q" + bytes([level]) + b"(h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"e"
    return data + b"."


CRAFTED = {
    "billion_laughs": (billion_laughs(), "more than"),
    "self_containing": (b"\x80\x02]q\x00h\x00a.", "contains itself"),
    "memo_bomb": (b"\x80\x02]r\xff\xff\xff\xff.", "memo index"),
    "deep": (b"\x80\x02" + b"(" * 5000 + b"t" * 5000 + b".", "deeper than"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_crafted_edm_pickle_is_refused_quickly_naming_the_file(tmp_path, name):
    data, message = CRAFTED[name]
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(data)
    assert len(billion_laughs()) <= 896
    started = time.monotonic()
    with pytest.raises(EDMPickleError, match=message) as error:
        read_edm_pickle(path)
    assert str(path) in str(error.value)
    assert time.monotonic() - started < 20


def test_teacher_import_of_the_billion_laughs_pickle_is_one_line(tmp_path):
    path = tmp_path / "laughs.pkl"
    path.write_bytes(billion_laughs())
    result = CliRunner().invoke(main, ["teacher", "import", str(path), "--out", str(tmp_path / "t.pt")])
    assert result.exit_code != 0 and str(path) in result.output and "Traceback" not in result.output


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_cifar(folder, crafted_batch: int | None = None, marker=None) -> None:
    for index in range(1, 6):
        entry = {"batch_label": f"batch {index}", "data": np.full((4, 3072), index, dtype=np.uint8),
                 "labels": [index % 10] * 4, "filenames": [f"{index}_{i}.png" for i in range(4)]}
        if index == crafted_batch:
            entry["labels"] = _RunsCode(marker)
        with open(folder / f"data_batch_{index}", "wb") as handle:
            pickle.dump(entry, handle, protocol=2)


def test_cifar_batches_load_with_arrays_and_labels(tmp_path):
    write_cifar(tmp_path)
    data = load_cifar10(tmp_path)
    assert len(data) == 20 and int(data.images[4].float().mean()) == 2


def test_a_crafted_cifar_batch_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    write_cifar(tmp_path, crafted_batch=3, marker=marker)
    with pytest.raises(DataFormatError, match=r"data_batch_3.*refusing to load posix.system"):
        load_cifar10(tmp_path)
    assert not marker.exists()
    result = CliRunner().invoke(main, ["data", "info", "cifar10", "--path", str(tmp_path)])
    assert result.exit_code != 0 and "data_batch_3" in result.output and "Traceback" not in result.output
    assert not marker.exists()
