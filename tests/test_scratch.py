"""Scratch files (io/scratch.py): raw reads and writes at offsets, and mapped files whose
pages the process hands back (checked in /proc/self/smaps: what the kernel says this process
holds of the file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellmill.io.scratch import Mapped, read_raw, read_raw_into, write_raw

linux_only = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc")


def mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path`."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = head[-1] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_raw_writes_and_reads_at_offsets(tmp_path):
    path = tmp_path / "x.raw"
    a = np.arange(10, dtype=np.float64)
    write_raw(path, a[5:], 8 * 5)
    write_raw(path, a[:5], 0)
    np.testing.assert_array_equal(read_raw(path, np.float64, 10), a)
    out = np.empty(3, dtype=np.float64)
    np.testing.assert_array_equal(read_raw_into(path, out, 8 * 7), a[7:])
    with pytest.raises(EOFError, match="x.raw"):
        read_raw_into(path, np.empty(4), 8 * 7)


@linux_only
def test_mapped_file_hands_its_pages_back(tmp_path):
    path = tmp_path / "x.f64"
    values = np.arange(1 << 20, dtype=np.float64)  # 8 MB
    write_raw(path, values)
    m = Mapped(path, np.float64, (256, 4096))
    assert float(m.array.sum()) == float(values.sum())  # every page read
    assert mapped_kb(path) >= 8 * 1024 - 8
    m.release()
    assert mapped_kb(path) == 0
    assert m.array[255, 4095] == values[-1]  # read again from the file
    assert 0 < mapped_kb(path) < 4 * 1024  # (the kernel maps a few MB around a fault)


@linux_only
def test_mapped_file_hands_back_a_range_and_pickles_as_its_file(tmp_path):
    import pickle

    path = tmp_path / "y.i32"
    write_raw(path, np.arange(1 << 21, dtype=np.int32))  # 8 MB, 2048 pages
    m = Mapped(path, np.int32, (1 << 21,))
    assert int(m.array.sum(dtype=np.int64)) == (1 << 21) * ((1 << 21) - 1) // 2
    m.release(10, (1 << 22) - 10)  # widened to 2 MB spans: the first 4 MB
    assert mapped_kb(path) == 4096
    m.array[:1000].sum()
    m.release(4096, 4100)  # the first 2 MB span again
    assert mapped_kb(path) == 4096
    m.release(0, 10**12)
    assert mapped_kb(path) == 0
    copy = pickle.loads(pickle.dumps(m))
    assert copy.array.shape == (1 << 21,) and copy.array[12345] == 12345
    assert Mapped(path, np.int32, (0,)).array.shape == (0,)
