"""Rebuild the bundled emoji image-caption pairs from three Debian packages.

Run once by the maintainers, not at import time (needs ``apt-get`` and ``dpkg``; no root):

    python lmssl/data/emoji/build.py                 # fetches the three .debs with `apt-get download`
    python lmssl/data/emoji/build.py --debs DIR      # or uses the .debs already in DIR

Sources:
    fonts-noto-color-emoji   NotoColorEmoji.ttf: the pictures (a CBDT colour bitmap font, one 136x128 strike)
    unicode-data             emoji-test.txt: every fully-qualified emoji sequence, its name, group and subgroup
    unicode-cldr-core        annotations/en.xml and annotationsDerived/en.xml: the English CLDR keywords

Every fully-qualified emoji of ``emoji-test.txt`` is drawn with PIL (FreeType + raqm, which joins
ZWJ sequences, flags and skin-tone modifiers into one glyph) at the font's bitmap size (109 px,
``embedded_color=True``) onto white, padded to a white square, downscaled to ``SIZE`` pixels
(Lanczos), reduced to a ``COLOURS``-colour palette (median cut, no dither: a mean error of about
1/255 per channel, and a third of the bytes) and stored as a PNG. A sequence the font cannot draw
as one glyph is skipped and counted.

The caption is the emoji's name followed by its CLDR keywords that the name does not already
contain as whole words (``"grinning face, grin"``; ``"waving hand: medium skin tone, wave,
waving"``); ``captions`` holds ``[caption, name]``, for training on either.

The held-out split (``test.parquet``) is for zero-shot classification and retrieval. Emoji are
grouped into *clusters*: the name with its skin tones removed (``"waving hand: dark skin tone"``
belongs to ``"waving hand"``). Clusters are visited in the order of the sha256 of their name and
held out, whole, until ``HELD_OUT_CLUSTERS`` are; a cluster is taken only if none of its names
occurs, as whole words, in the name or keywords of any emoji left for training, so a held-out
name never appears in a training caption (its words may: ``"orange heart"`` is held out while
``"orange circle"`` and ``"red heart"`` are trained on). Flags (country names, which a picture
cannot teach) and the clusters of more than 6 emoji (two people with two skin tones: 20-26
near-copies) are never held out.

Outputs, next to this script, readable by ``datasets.load_dataset("parquet", ...)`` with the
features kept: ``train.parquet`` and ``test.parquet``. The build is deterministic: the same
package and library versions give byte-identical files. It prints the counts, sizes, sha256s and
the pixel mean/std of the training images, which ``__init__.py`` records.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from lmssl.data.emoji import GROUPS, MEAN, STD, features

HERE = Path(__file__).resolve().parent
PACKAGES = ("fonts-noto-color-emoji", "unicode-data", "unicode-cldr-core")
FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
ANNOTATIONS = ("usr/share/unicode/cldr/common/annotations/en.xml",
               "usr/share/unicode/cldr/common/annotationsDerived/en.xml")
FONT_PX = 109  # the font's one bitmap strike: glyphs of 136 x 128 pixels
GLYPH = (136, 128)
SIZE = 32  # stored image side
COLOURS = 128  # palette size of the stored PNGs
HELD_OUT_CLUSTERS = 150
MAX_HELD_OUT_CLUSTER = 6  # a base emoji and its five skin tones
SKIN_TONE = re.compile(r",?\s*\b(?:light|medium-light|medium|medium-dark|dark) skin tone\b")


@dataclass
class Emoji:
    text: str  # the emoji itself (a sequence of code points)
    name: str  # CLDR short name, as emoji-test.txt gives it
    group: str
    subgroup: str
    version: str  # the Emoji version that introduced it, e.g. "E1.0"
    keywords: list[str] = field(default_factory=list)

    @property
    def codepoints(self) -> str:
        return " ".join(f"{ord(c):04X}" for c in self.text)

    @property
    def cluster(self) -> str:
        """The name without skin tones: the unit the held-out split takes whole."""
        base = SKIN_TONE.sub("", self.name)
        return re.sub(r":\s*,\s*", ": ", base).strip().rstrip(":").strip()

    @property
    def caption(self) -> str:
        extra = [k for k in self.keywords if not _contains(self.name, k)]
        return ", ".join([self.name, *extra])


def _contains(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (case-insensitive)."""
    return re.search(rf"(?<![\w-]){re.escape(phrase.lower())}(?![\w-])", text.lower()) is not None


def parse_emoji_test(path: Path) -> list[Emoji]:
    """The fully-qualified emoji of ``emoji-test.txt`` in file order (the Component group,
    whose entries are skin-tone and hair swatches, has none)."""
    out, group, subgroup = [], "", ""
    line_re = re.compile(r"^([0-9A-F ]+);\s*fully-qualified\s*#\s*\S+\s+(E\d+\.\d+)\s+(.+)$")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (m := line_re.match(line)) is not None:
            text = "".join(chr(int(cp, 16)) for cp in m.group(1).split())
            out.append(Emoji(text, m.group(3).strip(), group, subgroup, m.group(2)))
    return out


def parse_annotations(paths: list[Path]) -> dict[str, list[str]]:
    """CLDR keywords by emoji, with U+FE0F removed from the key (CLDR's convention)."""
    keywords: dict[str, list[str]] = {}
    for path in paths:
        for node in ET.parse(path).getroot().iter("annotation"):
            if node.get("type") != "tts" and node.text:
                keywords[node.get("cp")] = [k.strip() for k in node.text.split("|") if k.strip()]
    return keywords


def render(font: ImageFont.FreeTypeFont, text: str) -> Image.Image | None:
    """One emoji -> ``SIZE x SIZE`` palette image on white; None when the font draws more than one glyph."""
    if font.getbbox(text)[2] != GLYPH[0]:  # raqm found no single glyph (ligature) for the sequence
        return None
    glyph = Image.new("RGBA", GLYPH, (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), text, font=font, embedded_color=True)
    side = max(GLYPH)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - GLYPH[0]) // 2, (side - GLYPH[1]) // 2))
    small = square.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
    return small.quantize(colors=COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def held_out_clusters(emoji: list[Emoji]) -> set[str]:
    """The clusters of the held-out split (see the module docstring)."""
    by_cluster: dict[str, list[Emoji]] = {}
    for e in emoji:
        by_cluster.setdefault(e.cluster, []).append(e)
    texts = {e.text: " | ".join([e.name, *e.keywords]) for e in emoji}  # what training would read of each emoji
    held: set[str] = set()
    training = set(texts)  # emoji still in training
    order = sorted(by_cluster, key=lambda c: hashlib.sha256(c.encode("utf-8")).hexdigest())
    for cluster in order:
        if len(held) == HELD_OUT_CLUSTERS:
            break
        members = by_cluster[cluster]
        if members[0].group == "Flags" or len(members) > MAX_HELD_OUT_CLUSTER:
            continue
        rest = training - {e.text for e in members}
        if any(_contains(texts[t], e.name) for e in members for t in rest):
            continue
        held.add(cluster)
        training = rest
    return held


def write_parquet(rows: list[tuple[Emoji, bytes]], path: Path) -> None:
    """pyarrow with zstd (see lmssl/data/fashion_mnist/build.py for why not Dataset.to_parquet);
    the schema is the one ``datasets`` derives from :func:`features`, metadata included."""
    names = [e.name for e, _ in rows]  # one class per emoji: its name (unique in emoji-test.txt)
    schema = features(names).arrow_schema
    columns = {
        "image": [{"bytes": png, "path": None} for _, png in rows],
        "caption": [e.caption for e, _ in rows],
        "captions": [[e.caption, e.name] for e, _ in rows],
        "name": [e.name for e, _ in rows],
        "keywords": [e.keywords for e, _ in rows],
        "emoji": [e.text for e, _ in rows],
        "codepoints": [e.codepoints for e, _ in rows],
        "group": [GROUPS.index(e.group) for e, _ in rows],
        "subgroup": [e.subgroup for e, _ in rows],
        "label": list(range(len(rows))),
    }
    table = pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in columns.items()}, schema=schema)
    pq.write_table(table, path, compression="zstd", compression_level=19, use_dictionary=["group", "subgroup"],
                   write_statistics=False)


def check_round_trip(path: Path, rows: list[tuple[Emoji, bytes]]) -> np.ndarray:
    """Reload ``path`` with ``datasets``; the features and captions must come back and every
    image must decode to the stored pixels. Returns the pixels ``(N, 32, 32, 3)``."""
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files={"data": str(path)}, split="data")
    if ds.features != features([e.name for e, _ in rows]):
        raise RuntimeError(f"{path.name}: features not kept: {ds.features}")
    if ds["caption"][:] != [e.caption for e, _ in rows]:
        raise RuntimeError(f"{path.name}: captions differ after reload")
    decoded = np.stack([np.asarray(im) for im in ds["image"]])
    stored = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for _, png in rows])
    if decoded.shape[1:] != (SIZE, SIZE, 3) or not np.array_equal(decoded, stored):
        raise RuntimeError(f"{path.name}: pixels differ after reload")
    return decoded


def fetch_debs(workdir: Path) -> None:
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=workdir, check=True)


def deb_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debs", type=Path, help=f"a folder holding {', '.join(PACKAGES)} .debs (default: download)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.debs.resolve() if args.debs else tmp
        if not args.debs:
            fetch_debs(tmp)
        root = tmp / "root"
        for package in PACKAGES:
            deb = next(folder.glob(f"{package}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            print(f"{package} {deb_version(deb)}")
        emoji = parse_emoji_test(root / EMOJI_TEST)
        keywords = parse_annotations([root / p for p in ANNOTATIONS])
        for e in emoji:
            e.keywords = keywords.get(e.text.replace("\ufe0f", ""), [])
        font = ImageFont.truetype(str(root / FONT), FONT_PX)
        drawn, skipped = [], []
        for e in emoji:
            image = render(font, e.text)
            (skipped.append(e) if image is None else drawn.append((e, png_bytes(image))))
    if len({e.name for e, _ in drawn}) != len(drawn):
        raise RuntimeError("two emoji share a name in emoji-test.txt; the label column needs them unique")
    held = held_out_clusters([e for e, _ in drawn])
    splits = {"train": [r for r in drawn if r[0].cluster not in held],
              "test": [r for r in drawn if r[0].cluster in held]}
    no_keywords = sum(1 for e, _ in drawn if not e.keywords)
    print(f"{len(emoji)} fully-qualified emoji; {len(drawn)} drawn, {len(skipped)} skipped "
          f"({', '.join(e.name for e in skipped[:5])}); {no_keywords} without CLDR keywords")
    for split, rows in splits.items():
        path = HERE / f"{split}.parquet"
        write_parquet(rows, path)
        pixels = check_round_trip(path, rows)
        per_group = [sum(1 for e, _ in rows if e.group == g) for g in GROUPS]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path.name}: {len(rows)} rows, {len({e.cluster for e, _ in rows})} clusters, per group {per_group}, "
              f"{path.stat().st_size} bytes, sha256 {digest}")
        if split == "train":
            x = pixels.astype(np.float64) / 255.0
            mean = tuple(round(float(v), 6) for v in x.mean(axis=(0, 1, 2)))
            std = tuple(round(float(v), 6) for v in x.std(axis=(0, 1, 2)))
            print(f"train pixels in [0, 1]: MEAN = {mean}  STD = {std}")
            if mean != MEAN or std != STD:
                print(f"update MEAN and STD in {HERE / '__init__.py'} (they say {MEAN}, {STD})")


if __name__ == "__main__":
    main()
