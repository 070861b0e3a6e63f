"""Triage layer figures: recall on the dev set (Wilson 95% CIs), false alarms on public sets, domains, speed, size.

    python bench/triage.py [--shared ../shared/data] [--lexicon-only]

Measures only: nothing here is tuned on dev.jsonl. Public sets are the held-out sides defined in
care/runtime/triage_data.py (Banking77 test.csv, Bitext odd crc32, MedQuAD odd crc32 of the focus).
Targets (issue 12): recall >= 0.97 overall and >= 0.90 per category; false alarms <= 0.5% on
Banking77 + Bitext and <= 2% on MedQuAD; <= 15 ms a message on one core; <= 60 MB on disk.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as on a phone
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care.runtime import triage, triage_data  # noqa: E402
from care.runtime.domains import detect_domain  # noqa: E402
from care.runtime.safety import load_rules, packaged_rules_path  # noqa: E402


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, centre - half), min(1.0, centre + half)


def fmt(k: int, n: int) -> str:
    p, lo, hi = wilson(k, n)
    return f"{p:.3f} [{lo:.3f}, {hi:.3f}]  ({k}/{n})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--dev", type=Path, default=triage_data.labelled_dir() / "dev.jsonl")
    ap.add_argument("--lexicon-only", action="store_true", help="the rules without the classifier")
    opts = ap.parse_args()
    rules = load_rules(Path("/nonexistent/safety.yaml"), classifier=not opts.lexicon_only)  # packaged rules only
    print(f"triage: {'lexicon only' if opts.lexicon_only else 'lexicon + classifier'}"
          f" (threshold {rules.model.threshold if rules.model else '-'})")

    dev = triage_data.read_labelled(opts.dev)
    emer = [r for r in dev if r.emergency]
    neg = [r for r in dev if not r.emergency]
    results = {id(r): rules.assess(r.text) for r in dev}
    hit = {id(r): results[id(r)].emergency for r in dev}
    print(f"\n== dev.jsonl: {len(emer)} emergencies, {len(neg)} negatives ==")
    print(f"recall overall (flagged)          {fmt(sum(hit[id(r)] for r in emer), len(emer))}   target >= 0.97")
    right = sum(hit[id(r)] and results[id(r)].category == r.category for r in emer)
    print(f"flagged with the right category   {fmt(right, len(emer))}")
    by_cat: dict[str, list] = defaultdict(list)
    for r in emer:
        by_cat[r.category].append(r)
    print("recall per category (flagged; right category)       target >= 0.90")
    worst = 1.0
    for cat in triage_data.CATEGORIES:
        rows = by_cat.get(cat, [])
        k = sum(hit[id(r)] for r in rows)
        kc = sum(hit[id(r)] and results[id(r)].category == cat for r in rows)
        worst = min(worst, k / len(rows)) if rows else worst
        print(f"  {cat:<25} {fmt(k, len(rows))}   right category {kc}/{len(rows)}")
    for key in ("kind", "lang"):
        print(f"recall per {key}")
        groups: dict[str, list] = defaultdict(list)
        for r in emer:
            groups[getattr(r, key)].append(r)
        for g, rows in sorted(groups.items()):
            print(f"  {g:<25} {fmt(sum(hit[id(r)] for r in rows), len(rows))}")
    print(f"false alarms on dev negatives     {fmt(sum(hit[id(r)] for r in neg), len(neg))}")
    groups = defaultdict(list)
    for r in neg:
        groups[r.kind].append(r)
    for g, rows in sorted(groups.items()):
        print(f"  {g:<25} {fmt(sum(hit[id(r)] for r in rows), len(rows))}")

    shared_ok = opts.shared.is_dir()
    if shared_ok:
        print(f"\n== public sets (held-out sides), from {opts.shared} ==")
        b77 = triage_data.banking77(opts.shared, "test")
        bit = triage_data.bitext(opts.shared, held_out=True)
        mq = triage_data.medquad(opts.shared, held_out=True)
        fb = sum(rules.assess(t).emergency for t in b77)
        fbit = sum(rules.assess(t).emergency for t in bit)
        fmq_list = [t for t in mq if rules.assess(t).emergency]
        print(f"false alarms Banking77 test       {fmt(fb, len(b77))}")
        print(f"false alarms Bitext (held out)    {fmt(fbit, len(bit))}")
        print(f"false alarms Banking77 + Bitext   {fmt(fb + fbit, len(b77) + len(bit))}   target <= 0.005")
        print(f"false alarms MedQuAD (held out)   {fmt(len(fmq_list), len(mq))}   target <= 0.02")
        for t in fmq_list[:5]:
            print(f"    e.g. {t}")

        print("\n== domains ==")
        consumer = [r.text for r in dev if r.emergency or r.kind in triage_data.MEDICAL_NEGATIVE_KINDS]
        for name, texts, want in (("MedQuAD (held out)", mq, "medical"), ("dev consumer medical", consumer, "medical"),
                                  ("Banking77 test", b77, "banking")):
            got = Counter(detect_domain(t) for t in texts)
            wrong = sum(v for k, v in got.items() if k not in (want, "general"))
            print(f"{name:<22} -> {want}: {fmt(got[want], len(texts))}; wrong specific domain "
                  f"{wrong / len(texts):.4f}; {dict(got)}")
        print("targets: medical >= 0.95 on both medical sets; Banking77 >= 0.80 banking, <= 0.01 wrong specific")
    else:
        print(f"\n(no {opts.shared}: public-set figures skipped)")

    print("\n== speed and size (one core) ==")
    texts = [r.text for r in dev] + (b77[:500] if shared_ok else [])
    rules.assess("warm up")
    # CPU time of this (single-threaded) process, so other work on a shared machine does not count;
    # wall-clock time is printed too.
    cpu, wall = [], []
    for t in texts:
        c0, w0 = time.process_time(), time.perf_counter()
        rules.assess(t)
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)
    for name, times in (("CPU", cpu), ("wall", wall)):
        times.sort()
        print(f"{name} time per message: mean {statistics.mean(times):.2f} ms, p50 {times[len(times) // 2]:.2f} ms, "
              f"p95 {times[int(len(times) * 0.95)]:.2f} ms (n={len(times)}); target <= 15 ms")
    files = [packaged_rules_path(), triage.model_path("model.npz"), triage.model_path("domain.npz")]
    size = sum(f.stat().st_size for f in files if f.is_file())
    print(f"on disk: {size / 1e6:.2f} MB ({', '.join(f'{f.name} {f.stat().st_size / 1e6:.2f}' for f in files if f.is_file())});"
          f" target <= 60 MB")
    print(f"\nworst category recall {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
