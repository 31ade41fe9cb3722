"""The result-table writer: the same text as pandas' to_csv, for every kind of column."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from cellmill.engine import tables


def frame(n: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    f = rng.standard_normal(n) * 10.0 ** rng.integers(-300, 300, n)
    f[:12] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 1e16, 1e-5, 0.1, 123456789.0,
              5e-324, 1.7976931348623157e308]
    words = np.array(["plain", "with, comma", 'a "quote"', "line\nbreak", "", "Sigmar1"])
    obj = words[rng.integers(0, len(words), n)].astype(object)
    obj[::17] = None
    obj[5::19] = np.nan
    return pd.DataFrame({
        "gene": words[rng.integers(0, len(words), n)],
        "value": f,
        "p": rng.random(n),
        "count": rng.integers(-5, 10**12, n),
        "small": rng.integers(0, 200, n).astype(np.uint8),
        "flag": rng.random(n) < 0.5,
        "note": obj,
        "cluster": pd.Categorical(rng.integers(0, 12, n).astype(str)),
        "cat_na": pd.Categorical(np.where(rng.random(n) < 0.2, None, "x")),
    })


def pandas_text(df: pd.DataFrame, header: bool = True) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, header=header)
    return buf.getvalue()


def fast_text(df: pd.DataFrame, header: bool = True) -> str:
    buf = io.StringIO()
    tables.write_csv(df, buf, header=header)
    return buf.getvalue()


@pytest.mark.parametrize("rows", [0, 1, 1000])
def test_same_text_as_pandas(rows, monkeypatch):
    monkeypatch.setattr(tables, "CSV_ROWS", 64)  # several pieces
    df = frame(1000).iloc[:rows]
    assert fast_text(df) == pandas_text(df)
    assert fast_text(df, header=False) == pandas_text(df, header=False)


def test_other_dtypes_left_to_pandas():
    df = frame(50)
    df["nullable"] = pd.array([None if i % 3 else i for i in range(50)], dtype="Int64")
    df["f32"] = np.linspace(0, 1, 50, dtype=np.float32)
    df["when"] = pd.Timestamp("2026-12-05")
    assert fast_text(df) == pandas_text(df)
    one = pd.DataFrame({"only": ["", "a"]})
    assert fast_text(one) == pandas_text(one)


def test_written_file_reads_back(tmp_path):
    df = frame(300)
    tables.write_table(df, tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv", keep_default_na=False, na_values=[""],
                       float_precision="round_trip")
    np.testing.assert_array_equal(back["value"].to_numpy(), df["value"].to_numpy())
    np.testing.assert_array_equal(back["count"].to_numpy(), df["count"].to_numpy())
    assert not (tmp_path / "t.csv.tmp").exists()


def test_string_dtype_columns():
    df = pd.DataFrame({"s": pd.array(["a", None, "b,c"], dtype="string"), "x": [1.5, 2.0, 3.0]})
    assert fast_text(df) == pandas_text(df)


def _texts(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    return [raw[a:b].decode("ascii") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def test_float_text_is_python_repr():
    # Python's repr (the shortest text that reads back to the same double) is the reference:
    # every power of two and its neighbours (the uneven rounding intervals), subnormals, any
    # bit pattern, and values of the tables' kinds
    from cellmill.kernels.text import float_text

    rng = np.random.default_rng(7)
    pw = 2.0 ** np.arange(-1074, 1024)
    bits = rng.integers(0, 2**63, 300_000, dtype=np.int64).view(np.float64)
    values = np.concatenate([
        [0.0, -0.0, 1.0, 0.1, 1e16, 1e15, 9999999999999998.0, 1e-4, 1e-5, 5e-324, 1e23,
         2.2250738585072014e-308, 1.7976931348623157e308, 9007199254740993.0, np.inf,
         -np.inf],
        pw, -pw, np.nextafter(pw, 0), np.nextafter(pw, np.inf), 10.0 ** np.arange(-323, 309),
        bits[~np.isnan(bits)], rng.random(50_000), np.round(rng.random(20_000), 3),
        rng.standard_normal(50_000) * 10.0 ** rng.integers(-300, 300, 50_000),
        rng.integers(-10**6, 10**6, 20_000).astype(float)])
    got = _texts(*float_text(values))
    want = [repr(v) for v in values.tolist()]
    bad = [(w, g) for w, g in zip(want, got, strict=True) if w != g]
    assert not bad, bad[:5]
    assert _texts(*float_text(np.array([np.nan, 2.5, -np.nan]))) == ["", "2.5", ""]


def test_int_text_is_str():
    from cellmill.kernels.text import int_text

    info = np.iinfo(np.int64)
    values = np.concatenate([[0, -1, 9, 10, 99, 100, info.min, info.max, info.min + 1],
                             np.random.default_rng(2).integers(info.min, info.max, 5000)])
    assert _texts(*int_text(values)) == [str(v) for v in values.tolist()]
