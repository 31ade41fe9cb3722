"""`cellmill info`: a plain-text summary of a store."""

from __future__ import annotations

import time
from pathlib import Path

from cellmill.errors import InputError
from cellmill.io.store import Store


def describe(path: str | Path) -> str:
    try:
        store = Store(path)
    except FileNotFoundError:
        raise InputError(path, "not a cellmill store") from None
    obs = store.obs()
    lines = [f"store   {store.path}",
             f"cells   {store.n_cells}", f"genes   {store.n_genes}",
             f"nonzero {store.nnz} ({store.nnz / max(1, store.n_cells):.0f} per cell)",
             f"blocks  {len(store.blocks) - 1}"]
    meta = [c for c in obs.columns if str(obs[c].dtype) == "category" and c != "sample"]
    lines.append("samples")
    for name, grp in obs.groupby("sample", observed=True, sort=False):
        desc = ", ".join(f"{c}={grp[c].iloc[0]}" for c in meta)
        lines.append(f"  {name}: {len(grp)} cells" + (f" ({desc})" if desc else ""))
    records = store.stage_records()
    lines.append("stages  " + (", ".join(records) if records else "none"))
    for name, rec in records.items():
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.get("finished", 0)))
        lines.append(f"  {name}: {rec.get('seconds', 0):.1f} s, "
                     f"peak {rec.get('peak_rss_mb', 0):.0f} MB, {when}")
    return "\n".join(lines)
