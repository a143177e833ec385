"""Synthetic raw rows in the trn.json line format, with the real file's shape and dirt.

    python -m prodtune.synth /tmp/trn-1.3M.json 1300000 --seed 0     (a .gz suffix compresses)
    python -m prodtune.synth /tmp/trn-1.3M.parquet 1300000           (.csv, .tsv: the same rows as a table)

Used by bench/bench_clean.py and scale tests: the real AmazonTitles-1.3MM file is a download, this
is not. Shares below are measured on the shipped sample (data/README.md) or stated for the full
file (about half the contents are empty); everything is drawn from one seeded RNG, so a given
(n_rows, seed) always writes the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prodtune.io import atomic_path

VERSION = 2  # bumped when the output for a given (n_rows, seed) changes; caches key on it

# Shares of rows (or of non-empty contents) that carry each kind of dirt.
EMPTY_CONTENT = 0.45      # content "" (the full file: roughly 40-50%)
BLANK_CONTENT = 0.005     # content of spaces / <br> only
DUPLICATE = 0.03          # exact copy of an earlier row's (title, content), new uid
SAME_TITLE = 0.02         # an earlier title with new content (other editions)
CONTENT_IS_TITLE = 0.003  # content repeats the title
SHORT_CONTENT = 0.01      # content under 20 characters
VERY_LONG = 0.003         # content of 10k-40k characters
TAGS = 0.08               # <br>, <p>, <b>, <i>, <li> ...
ENTITIES = 0.17           # &#8217; &#x2019; &amp; &quot; &mdash; &#160; ...
DOUBLE_ESCAPED = 0.02     # &amp;#8217; &amp;quot; ...
BOILERPLATE = 0.24        # "--This text refers to thePaperbackedition." and variants
ODD_UNICODE = 0.03        # NBSP, zero-width space, full-width letters, ligatures, combining marks
LABELS_MEAN = 22          # target_ind per row: LF-AmazonTitles-1.3M averages 22.2 labels a point
N_LABELS = 1_305_265      # ... out of 1,305,265 labels

_WORDS = """
the a of and for with in to on by from this that your our is are was be it its as at or an
new classic complete guide collection edition series volume set pack kit deluxe original
book novel story history life world war love children kids family home kitchen garden
cooking recipes music songs album live greatest hits vhs dvd movie film season episodes
toy game puzzle doll ballet tutu dress shirt shoes boots jacket bag watch ring necklace
stainless steel wooden plastic cotton leather glass ceramic silver gold black white blue
red green pink purple large small mini portable wireless digital electric battery charger
cable adapter case cover screen phone camera lens tripod light lamp bulb fan heater filter
water bottle cup mug plate bowl knife spoon fork pan pot oven grill coffee tea chocolate
vitamin supplement organic natural herbal soap shampoo lotion cream brush comb mirror towel
pillow blanket sheet mattress chair table desk shelf cabinet drawer door window curtain rug
author writer illustrated edited translated introduction foreword chapters pages readers
young adult teen beginner advanced practical essential ultimate simple easy quick best
american british french german italian spanish japanese chinese ancient modern medieval
science nature animals birds dogs cats horses ocean mountain river forest city travel map
art painting drawing photography design fashion style beauty health fitness yoga diet
business money management leadership marketing computer software programming internet
religion spiritual bible prayer meditation philosophy poetry essays letters memoir journal
mystery thriller romance fantasy adventure horror comedy drama western crime detective
high quality perfect gift great fun durable comfortable lightweight waterproof adjustable
""".split()

_TAGS = ["<br>", "<br />", "<p>", "</p>", "<b>", "</b>", "<i>", "</i>", "<li>", "<BR>",
         '<a href="http://www.amazon.com/">', "</a>", "<div class=\"x\">", "</div>", "<!-- c -->"]
_ENTITIES = ["&#8217;", "&#x2019;", "&#x2018;", "&amp;", "&quot;", "&mdash;", "&#8220;", "&#8221;",
             "&#160;", "&#x2026;", "&copy;", "&ndash;", "&#39;", "&#x92;", "&eacute;", "&lt;", "&gt;"]
_DOUBLE = ["&amp;#8217;", "&amp;quot;", "&amp;amp;", "&amp;#x2019;", "&amp;mdash;"]
_BOILERPLATE = [
    "--This text refers to an out of print or unavailable edition of this title.",
    "--This text refers to thePaperbackedition.",
    "--This text refers to theHardcoveredition.",
    "--This text refers to an alternatePaperbackedition.",
    "--This text refers to theAudio Cassetteedition.",
    "--This text refers to thePrint on Demand (Paperback)edition.",
    " This text refers to the Hardcover edition.",
    "--This text refers to theKindle Editionedition.",
]
_ODD = ["\u00a0", "\u200b", "\u3000", "\ufb01", "e\u0301", "\uff21\uff4d\uff41\uff5a\uff4f\uff4e",
        "\t", "\r\n", "\u2009", "\u00ad", "\u2122", "\u00bd", "\u2460"]


def _sentence(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(5, 22))
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".....!?")


def _title(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(2, 9))
    return " ".join(w.capitalize() if rng.random() < 0.7 else w for w in words)


def _uid(rng: random.Random) -> str:
    if rng.random() < 0.5:  # ISBN-10 for books, ASIN for the rest
        return f"{rng.getrandbits(33) % 10**10:010d}"
    return "B0" + "".join(rng.choices("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=8))


def _sprinkle(rng: random.Random, text: str, pieces: list[str], k: int) -> str:
    """Insert k random pieces at word boundaries."""
    words = text.split(" ")
    for _ in range(k):
        words.insert(rng.randrange(len(words) + 1), rng.choice(pieces))
    return " ".join(words)


def _content(rng: random.Random, pool: list[str], title: str) -> str:
    r = rng.random()
    if r < SHORT_CONTENT:
        return rng.choice(["Great book", "Nice.", "See title", "VHS tape", "New in box", "Good"])
    if r < SHORT_CONTENT + CONTENT_IS_TITLE:
        return title
    if r < SHORT_CONTENT + CONTENT_IS_TITLE + VERY_LONG:
        n = rng.randint(130, 500)
    else:
        n = max(1, int(rng.lognormvariate(1.6, 0.75)))
    text = " ".join(rng.choices(pool, k=n))
    if rng.random() < TAGS:
        text = _sprinkle(rng, text, _TAGS, rng.randint(1, 6))
    if rng.random() < ENTITIES:
        text = _sprinkle(rng, text, _ENTITIES, rng.randint(1, 5))
    if rng.random() < DOUBLE_ESCAPED:
        text = _sprinkle(rng, text, _DOUBLE, rng.randint(1, 3))
    if rng.random() < ODD_UNICODE:
        text = _sprinkle(rng, text, _ODD, rng.randint(1, 4))
    if rng.random() < BOILERPLATE:
        text += rng.choice(_BOILERPLATE)
    return text


def make_rows(n_rows: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Yield n_rows raw records {uid, title, content, target_ind, target_rel}, deterministic per seed."""
    rng = random.Random(seed)
    pool = [_sentence(rng) for _ in range(20_000)]
    recent: list[tuple[str, str]] = []  # earlier (title, content) pairs to duplicate from
    for i in range(n_rows):
        r = rng.random()
        if recent and r < DUPLICATE:
            title, content = rng.choice(recent)
        else:
            title = rng.choice(recent)[0] if recent and r < DUPLICATE + SAME_TITLE else _title(rng)
            if rng.random() < 0.02:
                title = _sprinkle(rng, title, _ENTITIES[:6], 1)
            c = rng.random()
            if c < EMPTY_CONTENT:
                content = ""
            elif c < EMPTY_CONTENT + BLANK_CONTENT:
                content = rng.choice(["  ", "<br>", "\n", "&nbsp;"])
            else:
                content = _content(rng, pool, title)
        if content and len(recent) < 5000:
            recent.append((title, content))
        elif content and rng.random() < 0.01:
            recent[rng.randrange(len(recent))] = (title, content)
        k = min(1 + int(rng.expovariate(1 / LABELS_MEAN)), 200)
        yield {"uid": _uid(rng), "title": title, "content": content,
               "target_ind": [rng.randrange(N_LABELS) for _ in range(k)], "target_rel": [1.0] * k}


def write_raw(path: str | Path, n_rows: int, seed: int = 0) -> Path:
    """Write n_rows synthetic records as JSON lines (gzip-compressed when the name ends in .gz)."""
    path = Path(path)
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    with atomic_path(path) as tmp:
        opener = gzip.open(tmp, "wt", encoding="utf-8", compresslevel=3) if path.suffix == ".gz" \
            else open(tmp, "w", encoding="utf-8")
        with opener as f:
            batch: list[str] = []
            for row in make_rows(n_rows, seed):
                batch.append(dumps(row))
                if len(batch) == 10_000:
                    f.write("\n".join(batch) + "\n")
                    batch.clear()
            if batch:
                f.write("\n".join(batch) + "\n")
    return path


PARQUET_ROW_GROUP = 1 << 18
"""Rows per parquet row group: 262,144 rows, about 80 MB of text, as many writers make them."""


def write_table(path: str | Path, n_rows: int, seed: int = 0) -> Path:
    """The same rows as write_raw, as a table: .parquet (all five columns), or .csv / .tsv (uid,
    title and content; a .gz suffix compresses) as a catalogue export would have them."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    name = path.name.removesuffix(".gz")
    parquet = name.endswith(".parquet")
    columns = ["uid", "title", "content"] + (["target_ind", "target_rel"] if parquet else [])
    batch_rows = PARQUET_ROW_GROUP if parquet else 10_000
    with atomic_path(path) as tmp:
        sink = gzip.open(tmp, "wb", compresslevel=3) if path.suffix == ".gz" else open(tmp, "wb")
        with sink:
            writer = None
            batch: list[dict[str, Any]] = []
            rows = make_rows(n_rows, seed)
            while True:
                batch = [dict((k, r[k]) for k in columns) for _, r in zip(range(batch_rows), rows)]
                if not batch:
                    break
                table = pa.Table.from_pylist(batch)
                if writer is None:
                    writer = (pq.ParquetWriter(sink, table.schema) if parquet else
                              pacsv.CSVWriter(sink, table.schema, write_options=pacsv.WriteOptions(
                                  delimiter="\t" if name.endswith(".tsv") else ",")))
                writer.write_table(table)
            if writer is not None:
                writer.close()
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic trn.json rows (real shape and dirt).")
    p.add_argument("path", help="output file (.json, .jsonl, .csv, .tsv or .parquet; .gz compresses)")
    p.add_argument("n_rows", type=int, help="number of rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    table = args.path.removesuffix(".gz").endswith((".csv", ".tsv", ".parquet"))
    print((write_table if table else write_raw)(args.path, args.n_rows, args.seed))


if __name__ == "__main__":
    main()
