"""Build .dvc/plots-template.html: DVC's plots page with Vega, Vega-Lite and vega-embed inlined.

`dvc plots show` fills a template's `{plot_divs}` with one `vegaEmbed(...)` call per chart;
DVC's own template loads the three libraries from jsDelivr, so its charts need internet. This
one carries their minified builds from scripts/plots-template/node_modules (the versions
pinned in package-lock.json) and omits DVC's `{scripts}` placeholder, which would add the CDN
tags back. Run after `npm ci --prefix scripts/plots-template`; the output is byte-identical for
the same lock file.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_MODULES = ROOT / "scripts" / "plots-template" / "node_modules"
TEMPLATE_PATH = ROOT / ".dvc" / "plots-template.html"
LIBRARIES = ("vega", "vega-lite", "vega-embed")  # load order: vega-lite and vega-embed need vega
# dvc_render.html.HTML replaces these three; only {plot_divs} is required.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- DVC's page (dvc_render.html.PAGE_HTML) with the libraries inlined instead of loaded
         from jsDelivr, so the charts draw offline: {libraries}.
         Built by scripts/build_plots_template.py from scripts/plots-template/package-lock.json;
         do not edit by hand. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def package_json(name: str) -> dict:
    """node_modules/<name>/package.json."""
    return json.loads((NODE_MODULES / name / "package.json").read_text(encoding="utf-8"))


def bundled_packages(library: str) -> list[str]:
    """npm packages whose sources the library's minified build contains (from its source map)."""
    source_map = NODE_MODULES / library / "build" / f"{library}.min.js.map"
    names = {library}
    for source in json.loads(source_map.read_text(encoding="utf-8"))["sources"]:
        # "../node_modules/d3-array/src/max.js" or, in vega's monorepo, "../../vega-util/src/..."
        match = re.search(r"node_modules/((?:@[^/]+/)?[^/]+)/", source) or re.match(
            r"(?:\.\./)+(vega-[^/]+)/", source
        )
        if match and (NODE_MODULES / match.group(1) / "package.json").is_file():
            names.add(match.group(1))
    return sorted(names)


def licence_text(name: str) -> str | None:
    """The LICENSE file an npm package ships, if any."""
    for path in sorted((NODE_MODULES / name).iterdir()):
        if path.is_file() and path.name.upper().startswith(("LICENSE", "LICENCE")):
            return path.read_text(encoding="utf-8").strip()
    return None


def banner(library: str) -> str:
    """A /*! */ comment: the library, every package in its build with version and licence, and
    each distinct licence text those packages ship (their notices must travel with the code)."""
    meta = package_json(library)
    lines = [f"{library} {meta['version']} ({meta['license']}) {meta.get('homepage', '')}".rstrip()]
    texts: dict[str, list[str]] = {}
    unlicensed = []
    for name in bundled_packages(library):
        package = package_json(name)
        if name != library:
            lines.append(f"  includes {name} {package['version']} ({package['license']})")
        text = licence_text(name)
        if text is None:
            unlicensed.append(name)
        else:
            texts.setdefault(text, []).append(name)
    if unlicensed:
        lines += ["", f"No LICENSE file in the npm package of: {', '.join(unlicensed)}."]
    for text, names in texts.items():
        lines += ["", f"Licence of {', '.join(names)}:", *text.splitlines()]
    body = "\n".join(f" * {line}".rstrip() for line in lines)
    if "*/" in body:
        raise SystemExit(f"{library}: a licence text contains '*/', which would end the comment")
    return f"/*!\n{body}\n */"


def inline_script(library: str) -> str:
    """<script> holding the library's banner and minified UMD build (it sets a global)."""
    code = (NODE_MODULES / library / "build" / f"{library}.min.js").read_text(encoding="utf-8")
    for forbidden in ("</script", *PLACEHOLDERS):
        if forbidden.lower() in code.lower():
            raise SystemExit(f"{library}.min.js contains {forbidden!r}: it cannot be inlined as is")
    return f"<script>\n{banner(library)}\n{code.strip()}\n</script>"


def build_page() -> str:
    """The whole template."""
    versions = ", ".join(f"{name} {package_json(name)['version']}" for name in LIBRARIES)
    scripts = "\n".join(inline_script(name) for name in LIBRARIES)
    page = PAGE.format(libraries=versions, scripts=scripts)
    counts = {placeholder: page.count(placeholder) for placeholder in PLACEHOLDERS}
    if counts != {"{plot_divs}": 1, "{scripts}": 0, "{refresh_tag}": 1}:
        raise SystemExit(f"placeholders in the page: {counts}")
    return page


def main() -> None:
    """Write the template (default .dvc/plots-template.html)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TEMPLATE_PATH)
    args = parser.parse_args()
    if not (NODE_MODULES / "vega").is_dir():
        raise SystemExit(f"no {NODE_MODULES}/vega: run `npm ci --prefix scripts/plots-template`")
    page = build_page()
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out} ({len(page.encode()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
