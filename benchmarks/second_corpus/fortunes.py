"""A second text corpus and labelled task for measuring lmssl away from the bundled King James text.

Debian's ``fortunes`` package (fortune-mod 1.99.1, BSD licence; the quotations are short texts
from many authors) holds ~15,000 fortunes in 40 files, one per category. This script writes

- ``fortunes_train.txt`` / ``fortunes_validation.txt``: every fortune of every category, one per
  line, every 10th of each file held out (pretraining text, ~2.2 MB / 0.26 MB);
- ``task_train.jsonl`` / ``task_validation.jsonl``: which of six categories (computers, people,
  politics, science, work, men-women) a fortune comes from, with the same 1-in-10 split, so no
  held-out fortune is in the pretraining text (4,318 / 484 examples).

Nothing here is shipped or needed to use lmssl; it reproduces the figures in recipes/README.md::

    apt-get download fortunes && dpkg -x fortunes_*.deb /tmp/fortunes
    python benchmarks/second_corpus/fortunes.py /tmp/fortunes/usr/share/games/fortunes /tmp/fortunes_data
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

CATEGORIES = ("computers", "people", "politics", "science", "work", "men-women")
HELD_OUT_EVERY = 10


def read_fortunes(path: Path) -> list[str]:
    """The fortunes of one strfile source (entries between lines holding ``%``), whitespace folded."""
    text = path.read_text(encoding="latin-1")
    items = (re.sub(r"\s+", " ", t).strip() for t in text.split("\n%\n"))
    return [t for t in items if len(t) > 20]


def build(source: Path, out: Path) -> dict[str, int]:
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix == "")
    if not files:
        raise SystemExit(f"no fortune files in {source}: pass the folder holding 'computers', 'people', ...")
    text = {"train": [], "validation": []}
    task = {"train": [], "validation": []}
    for f in files:
        for i, t in enumerate(read_fortunes(f)):
            split = "validation" if i % HELD_OUT_EVERY == 0 else "train"
            text[split].append(t)
            if f.name in CATEGORIES:
                task[split].append({"text": t, "label": f.name})
    random.Random(0).shuffle(task["train"])
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        (out / f"fortunes_{split}.txt").write_text("\n".join(text[split]) + "\n", encoding="utf-8")
        (out / f"task_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task[split]), encoding="utf-8")
    counts = {f"text_{k}": len(v) for k, v in text.items()} | {f"task_{k}": len(v) for k, v in task.items()}
    print(counts, dict(Counter(r["label"] for r in task["validation"])))
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/second_corpus/fortunes.py FORTUNES_DIR OUT_DIR")
    build(Path(sys.argv[1]), Path(sys.argv[2]))
