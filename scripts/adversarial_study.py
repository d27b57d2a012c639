"""The document's phase-2 questions, answered with numbers (docs/adversarial.md is written from its output).

    python scripts/adversarial_study.py --json docs/adversarial.json            # about 20 min on 2 cores
    python scripts/adversarial_study.py --quick                                  # a minute, to check it runs

1. Which digit pairs does a trained model confuse, and are they the easiest targeted attacks? Targeted PGD
   success for all 90 (source, target) pairs, rank-correlated with the confusion counts.
2. Does adversarial training (FGSM examples replacing half of each batch) improve clean test accuracy, robust
   accuracy (FGSM and PGD), both or neither?
3. Does retraining with the misclassified training examples (the document's proposal) improve either?
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from tuner import adversarial, data, models  # noqa: E402

CONFIG = models.ModelConfig(cell="GRU", units=128, optimizer="adam", learning_rate=0.003)
EPS = 0.1


def robust(model, x, y, *, steps: int) -> dict:
    fgsm = adversarial.fgsm(model, x, y, EPS)
    pgd = adversarial.pgd(model, x, y, EPS, steps=steps)
    return {"clean": models.evaluate(model, x, y), f"fgsm_{EPS}": models.evaluate(model, fgsm, y),
            f"pgd_{EPS}": models.evaluate(model, pgd, y)}  # fmt: skip


def ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v):  # average ranks for ties
        r[v == value] = r[v == value].mean()
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    subset, epochs, n_eval, per_pair, steps = (3000, 1, 300, 10, 5) if args.quick else (None, 5, 2000, 50, 10)
    splits = data.load(subset=subset, validation=True, seed=0)
    x_eval, y_eval = splits.x_test[:n_eval], splits.y_test[:n_eval]
    out: dict = {"config": CONFIG.__dict__, "epochs": epochs, "eps": EPS, "n_eval": n_eval, "batch_size": 256}
    t0 = time.perf_counter()

    plain = models.build_model(CONFIG, seed=0)
    models.train(plain, splits, batch_size=256, epochs=epochs, seed=0, evaluate_test=False)
    out["plain"] = {
        **robust(plain, x_eval, y_eval, steps=steps),
        "test_full": models.evaluate(plain, splits.x_test, splits.y_test),
    }
    # 1. confusions vs targeted attacks
    matrix = adversarial.confusion_matrix(plain, splits.x_test, splits.y_test)
    success = np.zeros((10, 10))
    for source in range(10):
        xs = splits.x_test[splits.y_test == source][:per_pair]
        ys = np.full(len(xs), source)
        for target in range(10):
            if target != source:
                adv = adversarial.pgd(plain, xs, ys, 0.05, steps=steps, target=target)
                success[source, target] = adversarial.attack_report(plain, xs, ys, adv, target=target)["success_rate"]
    off = ~np.eye(10, dtype=bool)
    rho = float(np.corrcoef(ranks(matrix[off].astype(float)), ranks(success[off]))[0, 1])
    top_confused = adversarial.most_confused(matrix, k=5)
    easiest = sorted(((int(s), int(t), float(success[s, t])) for s, t in zip(*np.nonzero(off))),
                     key=lambda r: -r[2])[:5]  # fmt: skip
    out["confusions"] = {"matrix": matrix.tolist(), "most_confused": top_confused, "easiest_targeted_eps0.05": easiest,
                         "targeted_success_eps0.05": success.round(3).tolist(), "spearman": rho}  # fmt: skip

    # 2. adversarial training
    adv_model = models.build_model(CONFIG, seed=0)
    models.train(adv_model, splits, batch_size=256, epochs=epochs, seed=0, evaluate_test=False, adversarial=(EPS, 0.5))
    out["adversarial_training"] = {**robust(adv_model, x_eval, y_eval, steps=steps),
                                   "test_full": models.evaluate(adv_model, splits.x_test, splits.y_test)}  # fmt: skip

    # 3. one more epoch: plain, or with the misclassified training examples repeated five times
    wrong = adversarial.misclassified(plain, splits.x_train, splits.y_train)
    out["misclassified_train"] = int(len(wrong))
    weights = plain.get_weights()
    for name, extra in (("one_more_epoch", 0), ("misclassified_x5", 5)):
        model = models.build_model(CONFIG, seed=0)
        model.set_weights(weights)
        idx = np.concatenate([np.arange(len(splits.y_train))] + [wrong] * extra)
        more = data.Splits(splits.x_train[idx], splits.y_train[idx], None, None, splits.x_test, splits.y_test, "")
        models.train(model, more, batch_size=256, epochs=1, seed=1, evaluate_test=False)
        out[name] = {**robust(model, x_eval, y_eval, steps=steps),
                     "test_full": models.evaluate(model, splits.x_test, splits.y_test)}  # fmt: skip
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1, default=float))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
