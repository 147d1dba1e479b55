"""Rebuild the bundled corpus from Debian's public-domain King James Version text.

Run once by the maintainers, not at import time:

    apt-get install bible-kjv          # the `bible` reader and its bible-kjv-text data
    python lmssl/data/corpus/build.py  # writes the files next to this script

Outputs (all UTF-8, one document per line):
    kjv_train.txt, kjv_validation.txt   one chapter per line, every 20th chapter held out
    genre_train.jsonl, genre_validation.jsonl
        a labelled task: three consecutive verses -> which division of the Bible they
        come from (6 classes). Passages come from the same chapter split as the text,
        so validation passages are from chapters the pretraining run never saw.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Division of each book, in canonical order (66 books).
DIVISIONS = {
    "law": "Genesis Exodus Leviticus Numbers Deuteronomy",
    "history": "Joshua Judges Ruth 1Samuel 2Samuel 1Kings 2Kings 1Chronicles 2Chronicles Ezra Nehemiah Esther",
    "wisdom": "Job Psalms Proverbs Ecclesiastes Song",
    "prophets": "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum "
    "Habakkuk Zephaniah Haggai Zechariah Malachi",
    "gospels": "Matthew Mark Luke John Acts",
    "epistles": "Romans 1Corinthians 2Corinthians Galatians Ephesians Philippians Colossians 1Thessalonians "
    "2Thessalonians 1Timothy 2Timothy Titus Philemon Hebrews James 1Peter 2Peter 1John 2John 3John Jude Revelation",
}


def book_division(book: str) -> str:
    key = book.replace("Song of Solomon", "Song").replace(" ", "")
    for division, books in DIVISIONS.items():
        if key in books.split():
            return division
    raise KeyError(f"unknown book {book!r}")


def read_chapters() -> list[tuple[str, list[str]]]:
    raw = subprocess.run(["bible", "-l0", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: list[tuple[str, list[str]]] = []
    header = re.compile(r"^(.+?) (\d+)$")
    verse = re.compile(r"^\s+\d+ (.*)$")
    for line in raw.splitlines():
        if not line.strip():
            continue
        if m := verse.match(line):
            chapters[-1][1].append(m.group(1).strip())
        elif m := header.match(line.strip()):
            chapters.append((m.group(1), []))
        else:  # continuation of a wrapped verse
            chapters[-1][1][-1] += " " + line.strip()
    return chapters


def main() -> None:
    chapters = read_chapters()
    rng = random.Random(0)
    text = {"train": [], "validation": []}
    passages = {"train": [], "validation": []}
    for i, (book, verses) in enumerate(chapters):
        split = "validation" if i % 20 == 10 else "train"
        text[split].append(" ".join(verses))
        label = book_division(book)
        for j in range(0, len(verses) - 2, 3):
            passages[split].append({"text": " ".join(verses[j : j + 3]), "label": label})
    for split, docs in text.items():
        (HERE / f"kjv_{split}.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    caps = {"train": 500, "validation": 120}
    for split, rows in passages.items():
        rng.shuffle(rows)
        kept, seen = [], {d: 0 for d in DIVISIONS}
        for row in rows:
            if seen[row["label"]] < caps[split]:
                seen[row["label"]] += 1
                kept.append(row)
        with open(HERE / f"genre_{split}.jsonl", "w", encoding="utf-8") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        print(split, len(text[split]), "chapters", len(kept), "passages", seen)


if __name__ == "__main__":
    main()
