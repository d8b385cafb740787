"""Write .dvc/plots/offline.html: the HTML template `dvc plots show` fills (.dvc/config: plots.html_template),
with Vega, Vega-Lite and Vega-Embed inlined, so that the plots draw without a network (DVC's own page
loads them from a CDN and stays blank offline).

    python -m venv /tmp/vl && /tmp/vl/bin/pip install vl-convert-python==1.9.0.post1
    /tmp/vl/bin/python scripts/vendor_vega.py

The bundle is vl-convert-python's ``javascript_bundle`` (Vega 5, Vega-Lite 5.20 — the Vega-Lite v5 schema of
DVC's templates — and Vega-Embed 6; all BSD-3-Clause, © the University of Washington Interactive Data Lab).
It is run once, by a maintainer; nothing here runs in the pipeline or the tests.
"""

from pathlib import Path

import vl_convert

VEGA_LITE = "5.20"
OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>debias plots</title>
<!-- Vega 5, Vega-Lite {vega_lite} and Vega-Embed 6 (BSD-3-Clause, Copyright (c) the University of Washington
     Interactive Data Lab, https://vega.github.io), bundled by vl-convert-python {vl_convert}
     (scripts/vendor_vega.py), so that the plots draw without a network. -->
<script>
{bundle}
</script>
<style>
body {{ font-family: sans-serif; }}
table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def main() -> None:
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle.lower() or "{plot_divs}" in bundle:
        raise SystemExit("the bundle cannot be inlined in a <script> element as it is")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(PAGE.format(vega_lite=VEGA_LITE, vl_convert=vl_convert.__version__, bundle=bundle))
    print(f"{OUT}: {OUT.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
