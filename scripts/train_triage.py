"""Train the triage classifier and the domain classifier; write care/data/triage/{model,domain}.npz.

    python scripts/train_triage.py [--shared ../shared/data]

Training only (scikit-learn; the runtime reads the .npz with numpy). Data: care/data/triage/train.jsonl
(never dev.jsonl), plus, as extra negatives / domain examples, the TRAINING sides of Banking77 (train.csv),
Bitext (even crc32) and MedQuAD (even crc32 of the focus); the other sides are what bench/triage.py
measures (care/runtime/triage_data.py). Licences: Banking77 CC BY 4.0, MedQuAD CC BY 4.0, Bitext
CDLA-Sharing-1.0 -- only derived hashed weights are shipped.

The triage threshold is chosen by 5-fold cross-validation on train.jsonl: the highest threshold whose
out-of-fold recall (lexicon OR classifier) reaches TARGET_RECALL, never below MIN_THRESHOLD.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care.runtime import triage, triage_data  # noqa: E402
from care.runtime.safety import load_rules  # noqa: E402

TARGET_RECALL = 0.975
MIN_THRESHOLD = 0.25
C = 10.0
SHARED_NEGATIVE_WEIGHT = 0.3
HARD_NEGATIVE_WEIGHT = 2.0  # the labelled negatives (idioms, history, questions) are the hard ones


CONTEXT = load_rules(Path("/nonexistent"), classifier=False).context


def matrix(texts: list[str]):
    from scipy.sparse import csr_matrix

    indptr, indices, data = [0], [], []
    for t in texts:
        norm = triage.normalize(t)
        f = triage.features(norm, CONTEXT.cues(norm))
        indices.extend(f.keys())
        data.extend(f.values())
        indptr.append(len(indices))
    return csr_matrix((np.array(data, dtype=np.float32), np.array(indices), np.array(indptr)),
                      shape=(len(texts), triage.N_BUCKETS))


def fit(x, y: list[str], w: np.ndarray, classes: list[str]):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=2000)
    clf.fit(x, y, sample_weight=w)
    assert list(clf.classes_) == classes, (clf.classes_, classes)
    return clf


def coef_full(clf, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    coef, bias = clf.coef_, clf.intercept_
    if len(classes) == 2:  # binary sklearn keeps one row: make it two symmetric ones
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    return coef, bias


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=triage_data.labelled_dir())
    opts = ap.parse_args()
    rng = random.Random(0)
    rows = triage_data.read_labelled(opts.out / "train.jsonl")
    have_shared = opts.shared.is_dir()
    if not have_shared:  # a checkout without ../shared/data: train.jsonl alone, keyword domains
        print(f"warning: {opts.shared} is absent: no public negatives, and no domain model (keyword rules)")
    shared_neg = (rng.sample(triage_data.banking77(opts.shared, "train"), 3000)
                  + triage_data.bitext(opts.shared, held_out=False)
                  + rng.sample(triage_data.medquad(opts.shared, held_out=False), 3000)) if have_shared else []
    print(f"train.jsonl: {len(rows)} rows ({sum(r.emergency for r in rows)} emergencies); "
          f"shared negatives: {len(shared_neg)}")
    classes = sorted([triage.NULL, *triage_data.CATEGORIES])
    y_rows = [r.category if r.emergency else triage.NULL for r in rows]
    x_rows = matrix([r.text for r in rows])
    row_w = np.array([1.0 if r.emergency else HARD_NEGATIVE_WEIGHT for r in rows])
    x_shared = matrix(shared_neg)
    from scipy.sparse import vstack

    # 5-fold out-of-fold probabilities on train.jsonl (the shared negatives always train).
    folds = np.array([i % 5 for i in range(len(rows))])
    rng2 = np.random.default_rng(0)
    rng2.shuffle(folds)
    p_emerg = np.zeros(len(rows))
    for k in range(5):
        tr = np.where(folds != k)[0]
        te = np.where(folds == k)[0]
        x = vstack([x_rows[tr], x_shared])
        y = [y_rows[i] for i in tr] + [triage.NULL] * len(shared_neg)
        w = np.concatenate([row_w[tr], np.full(len(shared_neg), SHARED_NEGATIVE_WEIGHT)])
        clf = fit(x, y, w, classes)
        proba = clf.predict_proba(x_rows[te])
        p_emerg[te] = 1.0 - proba[:, classes.index(triage.NULL)]
    lexicon = load_rules(Path("/nonexistent"), classifier=False)
    lex = np.array([lexicon.assess(r.text).emergency for r in rows])
    emer = np.array([r.emergency for r in rows])
    print(f"lexicon alone on train: recall {lex[emer].mean():.3f}, false alarms {lex[~emer].mean():.3f}")
    best = MIN_THRESHOLD
    for t in np.arange(0.95, MIN_THRESHOLD - 1e-9, -0.01):
        flag = lex | (p_emerg >= t)
        print(f"  t={t:.2f} CV recall {flag[emer].mean():.3f} CV false alarms {flag[~emer].mean():.3f}"
              if abs(t * 20 - round(t * 20)) < 1e-6 else "", end="\n" if abs(t * 20 - round(t * 20)) < 1e-6 else "")
        if flag[emer].mean() >= TARGET_RECALL:
            best = float(round(t, 2))
            break
    flag = lex | (p_emerg >= best)
    print(f"chosen threshold {best:.2f}: CV recall {flag[emer].mean():.3f}, CV false alarms "
          f"{flag[~emer].mean():.3f}, classifier alone CV recall {(p_emerg >= best)[emer].mean():.3f}")
    x = vstack([x_rows, x_shared])
    y = y_rows + [triage.NULL] * len(shared_neg)
    w = np.concatenate([row_w, np.full(len(shared_neg), SHARED_NEGATIVE_WEIGHT)])
    clf = fit(x, y, w, classes)
    coef, bias = coef_full(clf, classes)
    model = triage.LinearModel.from_float(classes, coef, bias, best)
    model.save(opts.out / "model.npz")
    print(f"wrote {opts.out / 'model.npz'} ({(opts.out / 'model.npz').stat().st_size / 1e6:.2f} MB)")

    if not have_shared:
        return 0
    # Domain classifier: banking / general / medical (telecom stays keyword rules: no public telecom set).
    med = triage_data.medquad(opts.shared, held_out=False)
    dom_texts = (triage_data.banking77(opts.shared, "train") + triage_data.bitext(opts.shared, held_out=False)
                 + rng.sample(med, min(6000, len(med)))
                 + [r.text for r in rows if r.emergency or r.kind in triage_data.MEDICAL_NEGATIVE_KINDS])
    n_bank = len(triage_data.banking77(opts.shared, "train"))
    n_gen = len(triage_data.bitext(opts.shared, held_out=False))
    dom_y = ["banking"] * n_bank + ["general"] * n_gen + ["medical"] * (len(dom_texts) - n_bank - n_gen)
    # Medical consumer messages are few next to the public sets: weigh them up.
    dom_w = np.array([1.0] * (n_bank + n_gen + min(6000, len(med))) + [3.0] * (len(dom_texts) - n_bank - n_gen
                                                                                 - min(6000, len(med))))
    dclasses = ["banking", "general", "medical"]
    dclf = fit(matrix(dom_texts), dom_y, dom_w, dclasses)
    coef, bias = coef_full(dclf, dclasses)
    triage.LinearModel.from_float(dclasses, coef, bias, 0.5).save(opts.out / "domain.npz")
    print(f"wrote {opts.out / 'domain.npz'} ({(opts.out / 'domain.npz').stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
