"""Keras's SimpleRNN, GRU and LSTM with the 28-step recurrence run as fewer TensorFlow ops in training.

Keras on TensorFlow runs a recurrent layer step by step (a `while_loop`, or unrolled), and TensorFlow's
automatic gradient mirrors that: every step multiplies its input by the input kernel, and backward every step
makes three more products (the state's gradient and both weight gradients), each a small op of its own. Here:

- the input products of all steps are one matrix product before the recurrence;
- the layer is one `tf.custom_gradient` whose backward pass chains only what depends on the previous step
  (the elementwise gate gradients and one product with the recurrent kernel per step); each step's share of
  the weights' gradients (recurrent kernel, input kernel, biases) is a product or sum off that chain, which
  TensorFlow runs beside it; the sequences' gradient, when something needs it, is one product after it.

LSTM joined in the twentieth round (BENCHMARKS.md), for models whose trials loop over steps (`LSTM.fused`): on
earlier machines this treatment of it trained no faster (0.90-1.05x an epoch on the seventh, 1.01x on the
eighteenth) and traced its train step 0.3-0.4 s longer; on the twentieth (an Intel Xeon with AMX), where Keras's
28 per-step input products of LSTM-100 (128 x 28 by 28 x 400) took a sixth of a step's op time
(`bench/step_profile.py`), full-data LSTM-100/128 epochs trained 1.10-1.19x faster in four alternating runs.

The layers are subclasses that differ from Keras's only in `inner_loop`, and only in training: the same weights,
initial values, dropout masks (the cell's own, drawn as Keras draws them) and serialisation, the same function
up to float rounding (`tests/test_recurrent.py` compares outputs and gradients with Keras's). Inference, and
anything this path does not cover (a given initial state, masking, recurrent dropout, going backwards,
activations other than the defaults, GRU with `reset_after=False`, another backend), run Keras's loop.
"""

from __future__ import annotations

import keras
import tensorflow as tf

_SIGMOID = keras.activations.sigmoid
_TANH = keras.activations.tanh


def _inputs(x, kernel, bias):
    """Every step's input, steps x (batch, features), and input product, steps x (batch, g*units), the products
    made as one: x is (batch, steps, features)."""
    xt = tf.transpose(x, (1, 0, 2))
    steps = xt.shape[0]
    xw = tf.matmul(tf.reshape(xt, (-1, xt.shape[-1])), kernel) + bias
    return tf.unstack(xt, num=steps), tf.unstack(tf.reshape(xw, (steps, -1, kernel.shape[-1])), num=steps)


def _input_gradients(xs, dxw, kernel, bias):
    """The gradients of the sequences, the input kernel and its bias from each step's input products' gradient.

    The kernel's and the bias's are summed from each step's share, products and sums that depend on one step
    only, so TensorFlow runs them beside the recurrence's backward chain. As one product and one sum over all
    steps, with the stack of the steps' gradients they need, they waited for the whole chain and took 1.8 ms of
    a 9.7 ms SimpleRNN-128 step at batch 256 (`bench/step_profile.py`, BENCHMARKS.md's sixteenth round); this way
    an epoch of SimpleRNN-128 trains 1.10x faster, GRU-128 1.07x. The sequences' gradient (a lower layer's, or
    adversarial training's FGSM) is one product over all steps, which TensorFlow prunes when nothing uses it.
    """
    dkernel = _sum([_kernel_gradient(x, d) for x, d in zip(xs, dxw, strict=True)], kernel)
    dbias = _sum([tf.reduce_sum(d, 0) for d in dxw], bias)
    dxt = tf.matmul(tf.reshape(tf.stack(dxw), (-1, kernel.shape[-1])), kernel, transpose_b=True)
    dx = tf.transpose(tf.reshape(dxt, (len(xs), -1, kernel.shape[0])), (1, 0, 2))
    return dx, dkernel, dbias


def _weights(*weights):
    return [tf.convert_to_tensor(w) for w in weights]


def _kernel_gradient(previous, dz):
    """previous^T @ dz: one step's share of a kernel's gradient (the recurrent kernel's, or the input kernel's
    with the step's input as `previous`).

    Each step's share is its own product, summed at the end: it depends neither on the other steps' nor on the
    recurrence's next step, so TensorFlow runs it beside the recurrence (on the other core). One product over all
    steps after the recurrence ran 1.15x slower a GRU epoch (BENCHMARKS.md, section 1).
    """
    return tf.matmul(previous, dz, transpose_a=True)


def _sum(terms, like):
    """The steps' shares of a gradient (zeros shaped `like` if there are none), summed in one fixed order.

    Not `tf.add_n`, nor adds one after another: with them, a model and its adversarial wrapper (the same training
    step in another graph) trained to weights that differed in the last bits; TensorFlow's graph optimizer
    rewrites sums.
    """
    return tf.reduce_sum(tf.stack(terms), 0) if terms else tf.zeros_like(like)


def _step_gradients(dy, steps: int, sequences: bool):
    if dy is None:
        return [None] * steps
    return tf.unstack(dy, num=steps) if sequences else [None] * (steps - 1) + [dy]


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _simple(x, kernel, bias, recurrent_kernel, sequences: bool):
    """tanh SimpleRNN from a zero state on x, (batch, steps, features). Returns the states (or the last)."""

    @tf.custom_gradient
    def run(x, kernel, bias, recurrent_kernel):
        xs, xw = _inputs(x, kernel, bias)
        hs = [tf.tanh(xw[0])]
        for step in xw[1:]:
            hs.append(tf.tanh(step + tf.matmul(hs[-1], recurrent_kernel)))
        out = tf.stack(hs) if sequences else hs[-1]

        def grad(dy):
            dys = _step_gradients(dy, len(hs), sequences)
            dz, drecurrent = [None] * len(hs), []
            dh = None
            for t in reversed(range(len(hs))):
                dh = _add(dh, dys[t])
                dz[t] = tf.raw_ops.TanhGrad(y=hs[t], dy=dh)
                if t:
                    dh = tf.matmul(dz[t], recurrent_kernel, transpose_b=True)
                    drecurrent.append(_kernel_gradient(hs[t - 1], dz[t]))
            return (*_input_gradients(xs, dz, kernel, bias), _sum(drecurrent, recurrent_kernel))

        return out, grad

    return run(x, *_weights(kernel, bias, recurrent_kernel))


def _gru(x, kernel, bias, recurrent_kernel, recurrent_bias, sequences: bool):
    """Keras's GRU with reset_after=True (gates z, r, h) from a zero state on x, (batch, steps, features).
    Returns the states (or the last)."""

    @tf.custom_gradient
    def run(x, kernel, bias, recurrent_kernel, rbias):
        xs, xw = _inputs(x, kernel, bias)
        hs, saved = [], []
        h = None
        for step in xw:
            inner = rbias if h is None else tf.matmul(h, recurrent_kernel) + rbias
            xz, xr, xh = tf.split(step, 3, axis=1)
            rz, rr, rh = tf.split(inner, 3, axis=-1)
            z = tf.sigmoid(xz + rz)
            r = tf.sigmoid(xr + rr)
            hh = tf.tanh(xh + r * rh)
            h = (1 - z) * hh if h is None else z * h + (1 - z) * hh
            hs.append(h)
            saved.append((z, r, rh, hh))
        out = tf.stack(hs) if sequences else hs[-1]

        def grad(dy):
            dys = _step_gradients(dy, len(hs), sequences)
            dxw, drecurrent, dbias = [None] * len(hs), [], []
            dh = None
            for t in reversed(range(len(hs))):
                z, r, rh, hh = saved[t]
                dh = _add(dh, dys[t])
                previous = hs[t - 1] if t else tf.zeros_like(hh)
                dzz = tf.raw_ops.SigmoidGrad(y=z, dy=dh * (previous - hh))
                dah = tf.raw_ops.TanhGrad(y=hh, dy=dh * (1 - z))
                dzr = tf.raw_ops.SigmoidGrad(y=r, dy=dah * rh)
                dxw[t] = tf.concat([dzz, dzr, dah], 1)
                dinner = tf.concat([dzz, dzr, dah * r], 1)
                dbias.append(tf.reduce_sum(dinner, 0))
                if t:
                    dh = dh * z + tf.matmul(dinner, recurrent_kernel, transpose_b=True)
                    drecurrent.append(_kernel_gradient(hs[t - 1], dinner))
            inputs = _input_gradients(xs, dxw, kernel, bias)
            return (*inputs, _sum(drecurrent, recurrent_kernel), _sum(dbias, rbias))

        return out, grad

    return run(x, *_weights(kernel, bias, recurrent_kernel, recurrent_bias))


def _lstm(x, kernel, bias, recurrent_kernel, sequences: bool):
    """Keras's LSTM (gates i, f, c, o) from zero states on x, (batch, steps, features). Returns the states (or the
    last) and the last carry."""

    @tf.custom_gradient
    def run(x, kernel, bias, recurrent_kernel):
        xs, xw = _inputs(x, kernel, bias)
        hs, cs, saved = [], [], []
        for step in xw:
            z = step if not hs else step + tf.matmul(hs[-1], recurrent_kernel)
            zi, zf, zg, zo = tf.split(z, 4, axis=1)
            i, f, g, o = tf.sigmoid(zi), tf.sigmoid(zf), tf.tanh(zg), tf.sigmoid(zo)
            c = i * g if not cs else f * cs[-1] + i * g
            tc = tf.tanh(c)
            hs.append(o * tc)
            cs.append(c)
            saved.append((i, f, g, o, tc))
        out = tf.stack(hs) if sequences else hs[-1]

        def grad(dy, dcarry):
            dys = _step_gradients(dy, len(hs), sequences)
            dz, drecurrent = [None] * len(hs), []
            dh, dc = None, dcarry
            for t in reversed(range(len(hs))):
                i, f, g, o, tc = saved[t]
                dh = _add(dh, dys[t])
                dc = _add(dc, tf.raw_ops.TanhGrad(y=tc, dy=dh * o))
                df = tf.raw_ops.SigmoidGrad(y=f, dy=dc * cs[t - 1]) if t else tf.zeros_like(f)
                dz[t] = tf.concat([tf.raw_ops.SigmoidGrad(y=i, dy=dc * g), df, tf.raw_ops.TanhGrad(y=g, dy=dc * i),
                                   tf.raw_ops.SigmoidGrad(y=o, dy=dh * tc)], 1)  # fmt: skip
                if t:
                    dh = tf.matmul(dz[t], recurrent_kernel, transpose_b=True)
                    dc = dc * f
                    drecurrent.append(_kernel_gradient(hs[t - 1], dz[t]))
            return (*_input_gradients(xs, dz, kernel, bias), _sum(drecurrent, recurrent_kernel))

        return (out, cs[-1]), grad

    return run(x, *_weights(kernel, bias, recurrent_kernel))


def _covered(layer, mask) -> bool:
    cell = layer.cell
    return (
        layer._zero_start
        and keras.backend.backend() == "tensorflow"
        and mask is None
        and not layer.go_backwards
        and not layer.stateful
        and not cell.recurrent_dropout
        and cell.activation is _TANH
        and getattr(cell, "recurrent_activation", _SIGMOID) is _SIGMOID
        and getattr(cell, "implementation", 2) == 2
        and getattr(cell, "reset_after", True)
    )


class _Fused:
    """What the three layers share: the choice of path, and the input dropout as Keras's cell applies it."""

    _zero_start = False
    fused = True  # training runs the fused recurrence where `_covered`; LSTM's layer only once chosen (below)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        self._zero_start = initial_state is None  # the fused recurrences start from zero states
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        # Inference (evaluation, prediction, attacks) keeps Keras's loop: a rolled loop traces faster, and in batches
        # of 2,048 images a step's ops are large enough that fewer of them gain nothing.
        if not (training and self.fused and _covered(self, mask)):
            return super().inner_loop(sequences, initial_state, mask, training)
        if self.cell.dropout:
            mask = self.cell.get_dropout_mask(sequences[:, 0, :])  # the cell's own mask, drawn by RNN.call
            sequences = sequences * tf.expand_dims(mask, 1)
        out, states = self._recurrence(sequences, self.cell)
        last = out[-1] if self.return_sequences else out
        outputs = tf.transpose(out, (1, 0, 2)) if self.return_sequences else out
        return last, outputs, [last, *states]


@keras.saving.register_keras_serializable(package="tuner")
class SimpleRNN(_Fused, keras.layers.SimpleRNN):
    __doc__ = keras.layers.SimpleRNN.__doc__

    def _recurrence(self, x, cell):
        bias = cell.bias if cell.use_bias else tf.zeros((cell.units,), cell.kernel.dtype)
        return _simple(x, cell.kernel, bias, cell.recurrent_kernel, self.return_sequences), []


@keras.saving.register_keras_serializable(package="tuner")
class GRU(_Fused, keras.layers.GRU):
    __doc__ = keras.layers.GRU.__doc__

    def _recurrence(self, x, cell):
        if cell.use_bias:
            input_bias, recurrent_bias = cell.bias[0], cell.bias[1]
        else:
            input_bias = recurrent_bias = tf.zeros((3 * cell.units,), cell.recurrent_kernel.dtype)
        return _gru(x, cell.kernel, input_bias, cell.recurrent_kernel, recurrent_bias, self.return_sequences), []


@keras.saving.register_keras_serializable(package="tuner")
class LSTM(_Fused, keras.layers.LSTM):
    __doc__ = keras.layers.LSTM.__doc__

    # Keras's loop until `tuner.models.choose_steps_per_execution` turns the fused recurrence on, for a model whose
    # trials are long enough to loop over steps: its train step traces 0.4-0.5 s longer than Keras's, and with it
    # on in every model, small searches (1,000 images) ran 0.96x as fast (BENCHMARKS.md, the twentieth round).
    fused = False

    def _recurrence(self, x, cell):
        bias = cell.bias if cell.use_bias else tf.zeros((4 * cell.units,), cell.kernel.dtype)
        out, carry = _lstm(x, cell.kernel, bias, cell.recurrent_kernel, self.return_sequences)
        return out, [carry]
