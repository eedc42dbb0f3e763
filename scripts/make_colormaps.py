"""Write app/data/colormaps.json: matplotlib's published perceptual colour maps, copied once.

The server draws heatmaps with these tables but never imports matplotlib; this script (run by
hand, with matplotlib installed) is the only place the tables come from, and
tests/test_visuals.py checks that the file still equals matplotlib's tables exactly.

    python scripts/make_colormaps.py
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib import colormaps

NAMES = ("viridis", "inferno")
TARGET = Path(__file__).resolve().parent.parent / "app" / "data" / "colormaps.json"


def main() -> None:
    tables = {}
    for name in NAMES:
        cmap = colormaps[name]
        # .colors is the published 256 x RGB float table (matplotlib/_cm_listed.py); floats round-trip in JSON.
        tables[name] = [[float(v) for v in rgb] for rgb in cmap.colors]
    payload = {"source": "matplotlib._cm_listed (CC0, van der Walt & Smith)", "colormaps": tables}
    TARGET.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    print(f"wrote {TARGET} ({', '.join(NAMES)})")


if __name__ == "__main__":
    main()
