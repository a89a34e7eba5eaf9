"""Entry point of the wordcount example: `wordcount.job:main(client, chunks=..., top=...)`.

The corpus ships with the package. It is split into `chunks` pieces that are counted on the
cluster's workers in parallel, then merged on the cluster; only the small summary comes back.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
WORD = re.compile(r"[a-z']+")


def count_words(text: str) -> Counter:
    return Counter(WORD.findall(text.lower()))


def merge(counts: list[Counter]) -> Counter:
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return total


def split(lines: list[str], chunks: int) -> list[str]:
    """`chunks` pieces of whole lines, as even as the line count allows."""
    size, extra = divmod(len(lines), chunks)
    pieces, start = [], 0
    for i in range(chunks):
        end = start + size + (1 if i < extra else 0)
        pieces.append("".join(lines[start:end]))
        start = end
    return pieces


def main(client, chunks: int = 64, top: int = 10, label: str = "") -> dict:
    chunks = int(chunks)
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    pieces = split(lines, chunks)
    print(f"counting {len(lines)} lines in {chunks} chunks on {len(client.nthreads())} workers")
    partial = client.map(count_words, pieces, pure=False)
    total = client.submit(merge, partial).result()
    ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
    print(f"{sum(total.values())} words, {len(total)} distinct")
    return {
        "label": label,
        "chunks": chunks,
        "lines": len(lines),
        "total_words": sum(total.values()),
        "distinct_words": len(total),
        "top": [[word, count] for word, count in ranked[: int(top)]],
    }
