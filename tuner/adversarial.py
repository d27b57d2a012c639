"""Which digits a model confuses, adversarial examples against it, and training on them.

    confusion_matrix -> most_confused / consistent_pairs      (which digits are mixed up, across trials)
    fgsm / pgd -> attack_report, save_grid_png                 (L-infinity attacks on pixels in [0, 1])
    make_adversarial_model                                      (FGSM examples mixed into every training batch)
    misclassified                                               (indices to retrain on)

The attacks are hand-written on tf.GradientTape because adversarial-robustness-toolbox 1.20, the one maintained
library that does attack Keras 3 models (through TensorFlowV2Classifier), adds scikit-learn and SciPy, runs PGD
eagerly about 50 times slower here, and cannot run inside a Keras `train_step`, which adversarial training needs
anyway (cleverhans 4.0 is unmaintained since 2021 and pulls tensorflow-probability and nose; foolbox 3 pulls
eagerpy and GitPython). Gradients are taken on the logits under the final softmax, so a very confident model
does not hide its gradient behind a saturated softmax. Knows nothing of Optuna.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

N_CLASSES = 10
ATTACK_BATCH = 512  # images per gradient computation: 10,000 MNIST images fit in memory a batch at a time


# --------------------------------------------------------------------------------------------- checks


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float | np.floating | np.integer) or not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1] (pixels are in [0, 1]), got {eps!r}")
    return float(eps)


def _check_share(share: float) -> float:
    if isinstance(share, bool) or not isinstance(share, int | float | np.floating | np.integer) or not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1] (the part of each batch made adversarial), got {share!r}")
    return float(share)


def _check_classes(values, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return arr.astype(np.int32)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} classes must be integers 0..{N_CLASSES - 1}, got {arr.dtype} values")
    bad = arr[(arr < 0) | (arr >= N_CLASSES)]
    if bad.size:
        raise ValueError(f"unknown {what} class {int(bad.ravel()[0])}: classes are the digits 0..{N_CLASSES - 1}")
    return arr.astype(np.int32)


def _check_images(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError("no images given: x is empty")
    y = _check_classes(y, "label")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"x holds {len(x)} images but y has shape {y.shape}; expected ({len(x)},)")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"pixels must be in [0, 1], got [{x.min():g}, {x.max():g}]; scale the images first")
    return x, y


def _check_target(target, n: int) -> np.ndarray | None:
    """None (untargeted) or one target class per image, from a single int or an array of n."""
    if target is None:
        return None
    arr = _check_classes(target, "target")
    if arr.ndim == 0:
        return np.full(n, int(arr), dtype=np.int32)
    if arr.shape != (n,):
        raise ValueError(f"target must be one class or one per image ({n}), got shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------- confusions


def predict(model, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities of `model` on `x`, shape (n, 10)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        raise ValueError("no images given: x is empty")
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def confusion_matrix(model, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """10x10 counts: row = true digit, column = predicted digit."""
    x, y = _check_images(x, y)
    pred = predict(model, x, batch_size=batch_size).argmax(axis=1)
    return np.bincount(y * N_CLASSES + pred, minlength=N_CLASSES * N_CLASSES).reshape(N_CLASSES, N_CLASSES)


def most_confused(matrix: np.ndarray, k: int = 10) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal cells as (true, predicted, count), largest first; pairs never confused are left out.

    Ties are broken by (true, predicted), so the order is the same on every run.
    """
    m = _check_matrix(matrix)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cells = [(int(m[t, p]), t, p) for t in range(N_CLASSES) for p in range(N_CLASSES) if t != p and m[t, p] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(t, p, count) for count, t, p in cells[:k]]


def consistent_pairs(matrices: Sequence[np.ndarray], k: int = 5) -> list[tuple[int, int, int]]:
    """Pairs (true, predicted, total count) that are in the top-k of every matrix: the confusions that do not
    depend on the trial. Largest total first."""
    if len(matrices) == 0:
        raise ValueError("no confusion matrices given")
    tops = [{(t, p) for t, p, _ in most_confused(m, k)} for m in matrices]
    common = set.intersection(*tops)
    total = sum(_check_matrix(m) for m in matrices)
    return sorted(((t, p, int(total[t, p])) for t, p in common), key=lambda c: (-c[2], c[0], c[1]))


def misclassified(model, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Indices of the images `model` gets wrong, in ascending order (for retraining on them)."""
    x, y = _check_images(x, y)
    return np.flatnonzero(predict(model, x, batch_size=batch_size).argmax(axis=1) != y)


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix)
    if m.shape != (N_CLASSES, N_CLASSES):
        raise ValueError(f"a confusion matrix is {N_CLASSES}x{N_CLASSES}, got shape {m.shape}")
    return m


# --------------------------------------------------------------------------------------------- attacks


def fgsm(model, x: np.ndarray, y: np.ndarray, eps: float, *, target=None, batch_size: int = ATTACK_BATCH) -> np.ndarray:
    """Fast gradient sign method: one step of size eps.

    Untargeted, it raises the loss of the true label `y`; with `target` (one class, or one per image), it
    lowers the loss of the target class. The result stays in [0, 1] and within eps of `x` per pixel.
    """
    eps = _check_eps(eps)
    x, y = _check_images(x, y)
    return _attack(model, x, y, _check_target(target, len(x)), eps, steps=1, step_size=eps, start=x, batch=batch_size)


def pgd(
    model,
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    *,
    steps: int = 20,
    step_size: float | None = None,
    target=None,
    seed: int = 0,
    random_start: bool = True,
    batch_size: int = ATTACK_BATCH,
) -> np.ndarray:
    """Projected gradient descent (Madry et al.): `steps` sign steps, each projected back into the eps ball.

    `step_size` defaults to 2.5 * eps / steps, so the walk can reach any corner of the ball; with
    `random_start` it begins at a seeded uniform point of the ball. Targets as in `fgsm`.
    """
    eps = _check_eps(eps)
    x, y = _check_images(x, y)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size!r}")
    start = x
    if random_start:
        start = np.clip(x + np.random.default_rng(seed).uniform(-eps, eps, x.shape).astype(np.float32), 0, 1)
    targets = _check_target(target, len(x))
    return _attack(model, x, y, targets, eps, steps=steps, step_size=float(step_size), start=start, batch=batch_size)


def _attack(model, x, y, target, eps, *, steps, step_size, start, batch) -> np.ndarray:
    """Sign-gradient steps from `start`, projected on the eps ball of `x` intersected with [0, 1]."""
    run = _attack_fn(model, x.shape[1:])
    labels, sign = (y, 1.0) if target is None else (target, -1.0)  # up the true label's loss, down the target's
    out = np.empty_like(x)
    for i in range(0, len(x), batch):
        part = slice(i, i + batch)
        out[part] = run(x[part], start[part], labels[part], eps, step_size, sign, steps).numpy()
    return out


_ATTACK_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _attack_fn(model, shape: tuple[int, ...]):
    """The attack loop compiled once per model (every eps, target and batch size shares the one graph)."""
    import tensorflow as tf

    compiled = _ATTACK_FNS.setdefault(model, {})
    if shape in compiled:
        return compiled[shape]
    logits = _logits_fn(model)
    image, scalar = tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((), tf.float32)
    signature = [image, image, tf.TensorSpec((None,), tf.int32), scalar, scalar, scalar, tf.TensorSpec((), tf.int32)]

    @tf.function(input_signature=signature)
    def run(x0, adv, labels, eps, step_size, sign, steps):
        lo, hi = tf.maximum(x0 - eps, 0.0), tf.minimum(x0 + eps, 1.0)
        adv = tf.clip_by_value(adv, lo, hi)
        for _ in tf.range(steps):
            adv = tf.clip_by_value(adv + sign * step_size * _loss_gradient_sign(logits, adv, labels), lo, hi)
        return adv

    compiled[shape] = run
    return run


def _loss_gradient_sign(logits, x, labels):
    """sign(d cross-entropy(labels) / d x), the direction each pixel moves."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits(x)))
    return tf.sign(tape.gradient(loss, x))


def _logits_fn(model):
    """x -> logits of `model`: the pre-activation of a final softmax Dense, else the log of the output."""
    import keras

    last = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax:
        try:
            body = keras.Model(model.inputs, last.input)  # shares the weights: no copy
        except (AttributeError, ValueError, TypeError):  # a subclassed model has no graph to cut
            body = None
        if body is not None:

            def logits(x):
                z = keras.ops.matmul(body(x, training=False), last.kernel)
                return z if last.bias is None else z + last.bias

            return logits
    return lambda x: keras.ops.log(keras.ops.clip(model(x, training=False), 1e-30, 1.0))


def attack_report(model, x: np.ndarray, y: np.ndarray, adv: np.ndarray, *, target=None) -> dict:
    """Figures of one attack, plain Python values (JSON-ready).

    success_rate: untargeted, the share of correctly classified images that are now misclassified; targeted,
    the share of images neither of the target class nor already predicted as it that are now predicted as the
    target. It is None when no image could be attacked.
    """
    x, y = _check_images(x, y)
    adv = np.asarray(adv, dtype=np.float32)
    if adv.shape != x.shape:
        raise ValueError(f"adv has shape {adv.shape} but x has shape {x.shape}")
    targets = _check_target(target, len(x))
    clean_pred = predict(model, x).argmax(axis=1)
    adv_prob = predict(model, adv)
    adv_pred, adv_conf = adv_prob.argmax(axis=1), adv_prob.max(axis=1)
    if targets is None:
        attacked = clean_pred == y
        succeeded = attacked & (adv_pred != y)
    else:
        attacked = (y != targets) & (clean_pred != targets)
        succeeded = attacked & (adv_pred == targets)
    n_attacked, n_succeeded = int(attacked.sum()), int(succeeded.sum())
    return {
        "targeted": targets is not None,
        "n": len(x),
        "n_attacked": n_attacked,
        "n_succeeded": n_succeeded,
        "clean_accuracy": float((clean_pred == y).mean()),
        "adversarial_accuracy": float((adv_pred == y).mean()),
        "success_rate": n_succeeded / n_attacked if n_attacked else None,
        "mean_confidence": float(adv_conf.mean()),  # of the prediction on the adversarial image
        "mean_success_confidence": float(adv_conf[succeeded].mean()) if n_succeeded else None,
        "max_perturbation": float(np.abs(adv - x).max()),
    }


# --------------------------------------------------------------------------------------------- training


def make_adversarial_model(model, eps: float, share: float = 0.5):
    """A Keras model that trains `model` (whose weights it shares) with `share` of every batch replaced by FGSM
    examples made on the fly against the current weights (Goodfellow et al. mix half and half).

    Fit it like any model; it is compiled with `model`'s optimizer, loss, metrics and steps per execution, so the
    logs keep `loss` and `accuracy`. Validation and evaluation run on the clean inputs. Save or attack `model`
    itself afterwards. TensorFlow backend only.
    """
    import keras

    eps, share = _check_eps(eps), _check_share(share)
    if not getattr(model, "compiled", False):
        raise ValueError("compile the model before making it adversarial (its optimizer and loss are reused)")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"adversarial training needs the tensorflow Keras backend, not {keras.backend.backend()}")
    config = model.get_compile_config()
    wrapper = _adversarial_class()(model, eps=eps, share=share)
    wrapper.compile(
        optimizer=model.optimizer,
        loss=model.loss,
        metrics=_metrics(config.get("metrics")),
        weighted_metrics=_metrics(config.get("weighted_metrics")),
        steps_per_execution=model.steps_per_execution,
    )
    from tuner.models import build_training_state

    build_training_state(wrapper, tuple(model.input_shape[1:]))  # the wrapper's metrics: one trace, not two
    return wrapper


def _metrics(serialized: list | None) -> list | None:
    """Fresh metrics from a compile config's list. Keras would take a metric's config dict only once its own
    tracking had not wrapped it (as it has by the time the wrapper's compile reads it)."""
    import keras

    return None if serialized is None else [m if isinstance(m, str) else keras.metrics.get(m) for m in serialized]


@functools.cache
def _adversarial_class():
    """Defined on first use so that importing this module does not start TensorFlow."""
    import keras
    import tensorflow as tf

    class AdversarialTraining(keras.Model):
        def __init__(self, inner, *, eps: float, share: float) -> None:
            super().__init__(name=f"adversarial_{inner.name}")
            self.inner, self.eps, self.share = inner, eps, share
            self._logits = _logits_fn(inner)  # a closure: its weights are the inner model's, tracked once
            self.built = inner.built  # no weights of its own, so that building it traces nothing (models.py)

        def call(self, x, training=False):
            return self.inner(x, training=training)

        def compute_output_spec(self, x, training=False, mask=None):
            return self.inner.compute_output_spec(x, training=training)  # the inner model's, without tracing

        def train_step(self, data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            x = tf.convert_to_tensor(x, tf.float32)
            n_adv = tf.cast(tf.math.round(self.share * tf.cast(tf.shape(x)[0], tf.float32)), tf.int32)
            head, tail = x[:n_adv], x[n_adv:]
            labels = tf.cast(tf.reshape(y, [-1])[:n_adv], tf.int32)
            step = self.eps * _loss_gradient_sign(self._logits, head, labels)
            head = tf.stop_gradient(tf.clip_by_value(head + step, 0.0, 1.0))
            return super().train_step((tf.concat([head, tail], axis=0), y, sample_weight))

    return AdversarialTraining


# --------------------------------------------------------------------------------------------- pictures


def save_grid_png(
    path: str | Path,
    x: np.ndarray,
    adv: np.ndarray,
    clean_pred: np.ndarray,
    adv_pred: np.ndarray,
    n: int = 8,
) -> Path:
    """A PNG of the first n images: originals, perturbations (scaled to their largest value), adversarial images,
    each titled with the model's prediction."""
    from matplotlib.figure import Figure

    x, adv = np.asarray(x, dtype=np.float32), np.asarray(adv, dtype=np.float32)
    if len(x) == 0:
        raise ValueError("no images given: x is empty")
    if adv.shape != x.shape:
        raise ValueError(f"adv has shape {adv.shape} but x has shape {x.shape}")
    n = min(n, len(x))
    delta = adv[:n] - x[:n]
    scale = float(np.abs(delta).max()) or 1.0
    fig = Figure(figsize=(1.5 * n, 5.0))
    axes = fig.subplots(3, n, squeeze=False)
    for i in range(n):
        rows = [
            (x[i], "gray", 0, 1, f"clean: {int(clean_pred[i])}"),
            (delta[i], "seismic", -scale, scale, f"noise ±{scale:.2f}"),
            (adv[i], "gray", 0, 1, f"adv: {int(adv_pred[i])}"),
        ]
        for ax, (img, cmap, lo, hi, title) in zip(axes[:, i], rows):
            ax.imshow(img.reshape(28, 28) if img.size == 784 else img, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def save_confusion_png(path: str | Path, matrix: np.ndarray, *, title: str = "confusion matrix") -> Path:
    """A PNG of the matrix with counts in the cells; colours show the off-diagonal cells (the confusions) only."""
    from matplotlib.figure import Figure

    m = _check_matrix(matrix)
    off = np.ma.masked_array(m, mask=np.eye(N_CLASSES, dtype=bool))
    fig = Figure(figsize=(6.0, 5.5))
    ax = fig.subplots()
    ax.imshow(np.eye(N_CLASSES), cmap="Greys", vmin=0, vmax=4)  # diagonal in light grey
    image = ax.imshow(off, cmap="Reds", vmin=0, vmax=max(1, int(off.max() or 0)))
    fig.colorbar(image, ax=ax, label="images")
    top = max(1, int(off.max() or 0))
    for t in range(N_CLASSES):
        for p in range(N_CLASSES):
            colour = "white" if t != p and m[t, p] > 0.6 * top else "black"
            ax.text(p, t, str(int(m[t, p])), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(N_CLASSES))
    ax.set_yticks(range(N_CLASSES))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)  # Agg explicitly, without pyplot's global state
    fig.savefig(path, format="png", dpi=100)
    return path


__all__ = [
    "attack_report",
    "confusion_matrix",
    "consistent_pairs",
    "fgsm",
    "make_adversarial_model",
    "misclassified",
    "most_confused",
    "pgd",
    "predict",
    "save_confusion_png",
    "save_grid_png",
]
