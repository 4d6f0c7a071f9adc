"""``python -m bench.textindex --data FILE [FILE ...]``: the training text's index
(charrnn/textindex.py) on each text: build time, size in memory and on disk, and the time of
each query the service makes (microseconds, the median of many).

The walk (``advance``) follows the longest suffix of another text, written one character at a
time, that occurs in the indexed one (capped at ``--max-copy`` characters), and at the cap
asks which characters would extend it (``next_chars``): what a "no run longer than N from the
training text" mask costs a generated character. The other text is the indexed text's last
tenth (a copy: long matches) and the same characters shuffled within each line (short ones)."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from charrnn.textindex import TextIndex
from charrnn.vocab import Vocabulary


def _median_us(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e6, 2)


def _walk_us(index: TextIndex, ids: list[int], cap: int) -> dict[str, float]:
    """Mean µs a character of ``advance`` plus, at the cap, ``next_chars``."""
    m = index.root()
    at_cap = 0
    t = time.perf_counter()
    for c in ids:
        if m.length >= cap:
            index.next_chars(m)
            at_cap += 1
        m = index.advance(m, c, cap)
    spent = time.perf_counter() - t
    return {"us_per_char": round(spent / len(ids) * 1e6, 2), "share_at_cap": at_cap / len(ids)}


def measure(path: Path, max_copy: int, seed: int = 0) -> dict[str, object]:
    text = path.read_text(encoding="utf-8")
    vocab = Vocabulary.from_text(text)
    t = time.perf_counter()
    index = TextIndex.build(text, vocab)
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        saved = Path(d) / "x.index.npz"
        t = time.perf_counter()
        index.save(saved)
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        TextIndex.load(saved)
        load_s = time.perf_counter() - t
        size = saved.stat().st_size
    rng = random.Random(seed)
    ids = index.ids

    def run(length: int) -> list[int]:
        start = rng.randrange(len(ids) - length)
        return ids[start : start + length].tolist()

    runs = [run(max_copy) for _ in range(200)]
    lines = [ln for ln in text.split("\n") if ln]
    tail = vocab.encode(text[-len(text) // 10 :][:20000])
    shuffled = "\n".join(
        "".join(rng.sample(ln, len(ln))) for ln in text[-len(text) // 10 :][:20000].split("\n")
    )
    found = [m for m in (index.find(r) for r in runs) if m is not None]
    chars = [rng.randrange(len(vocab)) for _ in range(200)]
    turn = iter(range(10**9))

    def each(fn: Callable[[int], object]) -> Callable[[], object]:
        return lambda: fn(next(turn) % 200)

    return {
        "text": path.name,
        "chars": len(index),
        "vocab": len(vocab),
        "build_s": round(build_s, 3),
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 3),
        "memory_bytes": index.nbytes,
        "file_bytes": size,
        f"occurs_{max_copy}_chars_us": _median_us(each(lambda i: index.occurs(runs[i])), 2000),
        "extend_root_us": _median_us(each(lambda i: index.extend(index.root(), chars[i])), 2000),
        "extend_at_cap_us": _median_us(
            each(lambda i: index.extend(found[i % len(found)], chars[i])), 2000
        ),
        "next_chars_at_cap_us": _median_us(
            each(lambda i: index.next_chars(found[i % len(found)])), 2000
        ),
        "next_chars_root_us": _median_us(lambda: index.next_chars(index.root()), 200),
        "is_line_us": _median_us(each(lambda i: index.is_line(lines[i % len(lines)])), 2000),
        "walk_copied_text": _walk_us(index, tail, max_copy),
        "walk_shuffled_text": _walk_us(index, vocab.encode(shuffled), max_copy),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.textindex", description=__doc__)
    p.add_argument("--data", type=Path, nargs="+", required=True)
    p.add_argument("--max-copy", type=int, default=20, help="the walk's cap (characters)")
    args = p.parse_args()
    for path in args.data:
        print(json.dumps(measure(path, args.max_copy)))


if __name__ == "__main__":
    main()
