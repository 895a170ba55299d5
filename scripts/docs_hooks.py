"""MkDocs hook (mkdocs.yml ``hooks:``): publishes ``benchmarks/results/`` with the docs site.

The measured CSV / JSON files and their plots stay where the benchmarks write them; this adds each one to
the site as ``results/<name>``, so docs/benchmarks.md shows and links them (``results/<name>``) and a
missing result is a broken link that ``mkdocs build --strict`` fails on.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
