"""Rebuild dvc_plots.html, the offline page template of `dvc plots show` and `dvc plots diff`.

dvc-render's own page loads vega, vega-lite and vega-embed from a public CDN, so it is blank
where there is no internet. This template holds the three libraries inline instead: the page
DVC writes from it draws with no network, wherever it is written (``-o DIR``) or copied (a CI
artifact). dvc-render fills ``{plot_divs}`` and ``{refresh_tag}``; the template leaves out
``{scripts}``, the placeholder for the CDN tags.

Run from anywhere with the npm client on PATH (it reaches the npm registry):
``python vendor/vega/build.py``. It packs the versions pinned below, writes the template and
each package's licence beside this file. The majors follow dvc-render's (vega 5, vega-lite 5,
vega-embed 6: its specs use the vega-lite v5 schema).
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "dvc_plots.html"
# package: (version, its built browser bundle)
PACKAGES = {
    "vega": ("5.33.1", "build/vega.min.js"),
    "vega-lite": ("5.23.0", "build/vega-lite.min.js"),
    "vega-embed": ("6.29.0", "build/vega-embed.min.js"),
}
# The vega tarball ships no LICENSE; its monorepo's (BSD-3-Clause) is in each member package.
LICENCE_FROM = {"vega": "vega-view@5.16.1"}

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inline (vendor/vega/build.py): no network needed. -->
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


def _pack(spec: str, into: Path) -> tarfile.TarFile:
    name = subprocess.run(["npm", "pack", "--silent", spec], cwd=into, check=True,
                          capture_output=True, text=True).stdout.split()[-1]  # fmt: skip
    return tarfile.open(into / name)


def _read(archive: tarfile.TarFile, member: str) -> str:
    file = archive.extractfile(f"package/{member}")
    assert file is not None, member
    return file.read().decode("utf-8")


def main() -> None:
    """Pack the pinned versions, write the template and the licences."""
    scripts, versions = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, built) in PACKAGES.items():
            archive = _pack(f"{name}@{version}", Path(tmp))
            # No source-map comment: a browser would look for the .map beside the page.
            code = re.sub(r"^//# sourceMappingURL=.*$", "", _read(archive, built), flags=re.M)
            # Inline, a literal "</script" would end the element early.
            assert "</script" not in code.lower(), f"{name}: cannot be inlined as is"
            assert "{plot_divs}" not in code and "{refresh_tag}" not in code, name
            scripts.append(f"    <script>/* {name} {version} (BSD-3-Clause, see "
                           f"LICENSE-{name}) */\n{code.strip()}\n    </script>")  # fmt: skip
            licence = LICENCE_FROM.get(name)
            source = _pack(licence, Path(tmp)) if licence else archive
            (HERE / f"LICENSE-{name}").write_text(_read(source, "LICENSE"), encoding="utf-8")
            versions.append(f"{name} {version}")
    TEMPLATE.write_text(PAGE.format(scripts="\n".join(scripts)), encoding="utf-8")
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size // 1024} KiB): {', '.join(versions)}")


if __name__ == "__main__":
    main()
