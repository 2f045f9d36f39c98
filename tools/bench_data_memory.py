"""Peak memory of loading training data: a 1 MB file against a large one, each format, each in a fresh process.

    python tools/bench_data_memory.py --mb 200 [--bundle out/smollm2-lora] [--json data_memory.json]

The target is "a 1 GB .jsonl trains within +100 MB of a 1 MB one" (`--mb 1000` measures it; tokenizing takes
about 12 minutes per format with SmolLM2's tokenizer on one core). The loader (lars_ort.data.load_sequences) keeps
token ids in a temporary file, 4 bytes a token, so the large file's peak should be within a few MB of the small
one's.

Generates 1 MB and --mb MB files from the Shakespeare excerpts in tests/data, repeated: a .jsonl of {"text"} lines
(a few dozen lines of the play each) and a .txt. Each is loaded in a child process, which then draws --batches
batches through BatchStream; the child reports its peak RSS (VmHWM, lars_artifacts.measure.peak_rss_mb), the tokens
and the seconds the load took. The tokenizer is the bundle's (default: out/smollm2-lora or a bundle in out/bench),
else the tests' tiny BPE tokenizer (tests/tiny.py, needs the export extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAYS = [REPO / "tests" / "data" / "hamlet_act1.txt", REPO / "tests" / "data" / "macbeth_act1_eval.txt"]
SMALL_MB = 1
LINES_PER_DOCUMENT = 40


def default_bundle() -> Path | None:
    candidates = [REPO / "out" / "smollm2-lora", *sorted((REPO / "out" / "bench").glob("bundle-default-*"))]
    return next((c for c in candidates if (c / "manifest.json").is_file()), None)


def load_tokenizer(bundle: str | None, cache: Path):
    if bundle:
        from lars_artifacts import load_bundle
        from lars_ort.trainer import bundle_tokenizer

        return bundle_tokenizer(load_bundle(bundle, verify=False))
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import build_tokenizer

    from lars_artifacts import SpecialTokens
    from lars_ort.data import Tokenizer

    folder = cache / "tiny-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        build_tokenizer(folder)
    return Tokenizer(str(folder / "tokenizer.json"), SpecialTokens(eos_token_id=0, pad_token_id=0), None, 384)


def write_data(path: Path, megabytes: float) -> None:
    """A .jsonl of {"text"} documents or a .txt of the plays repeated, of about `megabytes` MB."""
    if path.is_file() and abs(path.stat().st_size - megabytes * 2**20) < 2**20 / 2:
        return
    lines = [line for play in PLAYS for line in play.read_text(encoding="utf-8").splitlines(keepends=True)]
    documents = ["".join(lines[i:i + LINES_PER_DOCUMENT]) for i in range(0, len(lines), LINES_PER_DOCUMENT)]
    if path.suffix == ".jsonl":
        unit = "".join(json.dumps({"text": d}) + "\n" for d in documents).encode()
    else:
        unit = "".join(documents).encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(max(1, round(megabytes * 2**20 / len(unit)))):
            f.write(unit)


def child(a) -> None:
    """Load one file and draw batches; print the numbers as one JSON line."""
    from lars_ort.data import BatchStream, load_sequences
    from lars_artifacts.measure import peak_rss_mb

    tok = load_tokenizer(a.bundle, Path(a.cache))
    before = peak_rss_mb()
    start = time.perf_counter()
    seqs = load_sequences(a.child, tok, a.seq_len)
    seconds = time.perf_counter() - start
    stream = BatchStream(seqs, a.batch_size, tok.pad_id, seed=0)
    for _ in range(a.batches):
        stream.next()
    print(json.dumps({"tokens": seqs.tokens, "sequences": len(seqs), "seconds": seconds,
                      "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}))


def measure(path: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--cache", a.cache, "--seq-len", str(a.seq_len),
           "--batch-size", str(a.batch_size), "--batches", str(a.batches)]
    if a.bundle:
        cmd += ["--bundle", a.bundle]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {"file": path.name, "mb": path.stat().st_size / 2**20, **json.loads(out.stdout.strip().splitlines()[-1])}


def table(rows: list[dict]) -> str:
    small = {Path(r["file"]).suffix: r["peak_rss_mb"] for r in rows if round(r["mb"]) == SMALL_MB}
    lines = ["| file | MB | tokens | seconds | RSS before load MB | peak RSS MB | Δ vs 1 MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = round(r["peak_rss_mb"] - small[Path(r["file"]).suffix])
        lines.append(f"| {r['file']} | {r['mb']:,.0f} | {r['tokens']:,} | {r['seconds']:,.1f} | "
                     f"{r['rss_before_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | {delta:+,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200, help="size of the large files in MB (the target: 1000)")
    bundle = default_bundle()
    p.add_argument("--bundle", default=str(bundle) if bundle else None,
                   help="bundle whose tokenizer to use (default: %(default)s; none: the tests' tiny tokenizer)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=20, help="batches drawn after loading")
    p.add_argument("--cache", default="/tmp/lars-bench-data", help="generated data files (reused)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    cache = Path(a.cache)
    rows = []
    for suffix in (".jsonl", ".txt"):
        for mb in (SMALL_MB, a.mb):
            path = cache / f"data-{mb:g}mb{suffix}"
            write_data(path, mb)
            rows.append(measure(path, a))
            print(f"{path.name}: {rows[-1]['peak_rss_mb']:,.0f} MB peak, {rows[-1]['seconds']:,.1f} s",
                  file=sys.stderr, flush=True)
    print(f"tokenizer: {a.bundle or 'tests/tiny.py'}; seq_len {a.seq_len}, {a.batches} batches of {a.batch_size}\n")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
