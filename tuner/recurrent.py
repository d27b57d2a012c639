"""Keras's SimpleRNN and GRU with the 28-step recurrence run as fewer TensorFlow ops in training.

Keras on TensorFlow runs a recurrent layer step by step (a `while_loop`, or unrolled), and TensorFlow's
automatic gradient mirrors that: every step multiplies its input by the input kernel, and backward every step
makes three more products (the state's gradient and both weight gradients), each a small op of its own. Here:

- the input products of all steps are one matrix product before the recurrence (and their gradients, taken by
  TensorFlow, one product each after it);
- the recurrence is a `tf.custom_gradient` whose backward pass chains only what depends on the previous step
  (the elementwise gate gradients and one product with the recurrent kernel per step); each step's share of
  the recurrent weights' gradient is a product off that chain, which TensorFlow runs beside it.

LSTM is not here: the same treatment of Keras's LSTM (measured at commit 24756ee, BENCHMARKS.md section 1) trained
no faster (0.90-1.05x an epoch on the seventh benchmark machine, 1.00x with step-by-step weight gradients on
the eighth) and traced its train step 0.3-0.4 s longer.

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


def _project(sequences, kernel, bias):
    """The input products of every step as one product: (batch, steps, features) -> steps x (batch, g*units)."""
    x = tf.transpose(sequences, (1, 0, 2))
    steps = x.shape[0]
    flat = tf.reshape(x, (-1, x.shape[-1]))
    xw = tf.matmul(flat, kernel)
    if bias is not None:
        xw = xw + bias
    return tf.unstack(tf.reshape(xw, (steps, -1, kernel.shape[-1])), num=steps)


def _kernel_gradient(previous, dz):
    """previous^T @ dz: one step's share of the recurrent kernel's gradient.

    Each step's share is its own product, summed at the end: it depends neither on the other steps' nor on the
    recurrence's next step, so TensorFlow runs it beside the recurrence (on the other core). One product over all
    steps after the recurrence ran 1.15x slower a GRU epoch (BENCHMARKS.md, section 1).
    """
    return tf.matmul(previous, dz, transpose_a=True)


def _sum(terms, like):
    """The steps' shares of a gradient (zeros shaped `like` if there are none), summed in one fixed order.

    Not `tf.add_n`: with it, a model and its adversarial wrapper (the same training step in another graph)
    trained to weights that differed in the last bits; TensorFlow's graph optimizer rewrites sums.
    """
    return tf.reduce_sum(tf.stack(terms), 0) if terms else tf.zeros_like(like)


def _step_gradients(dy, steps: int, sequences: bool):
    if dy is None:
        return [None] * steps
    return tf.unstack(dy, num=steps) if sequences else [None] * (steps - 1) + [dy]


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _simple(xw, recurrent_kernel, sequences: bool):
    """tanh SimpleRNN from a zero state; xw: list of (batch, units). Returns the states (or the last)."""

    @tf.custom_gradient
    def run(*args):
        *xw, kernel = args
        hs = [tf.tanh(xw[0])]
        for x in xw[1:]:
            hs.append(tf.tanh(x + tf.matmul(hs[-1], kernel)))
        out = tf.stack(hs) if sequences else hs[-1]

        def grad(dy):
            dys = _step_gradients(dy, len(hs), sequences)
            dz, dkernel = [None] * len(hs), []
            dh = None
            for t in reversed(range(len(hs))):
                dh = _add(dh, dys[t])
                dz[t] = tf.raw_ops.TanhGrad(y=hs[t], dy=dh)
                if t:
                    dh = tf.matmul(dz[t], kernel, transpose_b=True)
                    dkernel.append(_kernel_gradient(hs[t - 1], dz[t]))
            return (*dz, _sum(dkernel, kernel))

        return out, grad

    return run(*xw, tf.convert_to_tensor(recurrent_kernel))


def _gru(xw, recurrent_kernel, recurrent_bias, sequences: bool):
    """Keras's GRU with reset_after=True (gates z, r, h) from a zero state. Returns the states (or the last)."""

    @tf.custom_gradient
    def run(*args):
        *xw, kernel, rbias = args
        hs, saved = [], []
        h = None
        for x in xw:
            inner = rbias if h is None else tf.matmul(h, kernel) + rbias
            xz, xr, xh = tf.split(x, 3, axis=1)
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
            dx, dkernel, dbias = [None] * len(hs), [], []
            dh = None
            for t in reversed(range(len(hs))):
                z, r, rh, hh = saved[t]
                dh = _add(dh, dys[t])
                previous = hs[t - 1] if t else tf.zeros_like(hh)
                dzz = tf.raw_ops.SigmoidGrad(y=z, dy=dh * (previous - hh))
                dah = tf.raw_ops.TanhGrad(y=hh, dy=dh * (1 - z))
                dzr = tf.raw_ops.SigmoidGrad(y=r, dy=dah * rh)
                dx[t] = tf.concat([dzz, dzr, dah], 1)
                dinner = tf.concat([dzz, dzr, dah * r], 1)
                dbias.append(tf.reduce_sum(dinner, 0))
                if t:
                    dh = dh * z + tf.matmul(dinner, kernel, transpose_b=True)
                    dkernel.append(_kernel_gradient(hs[t - 1], dinner))
            return (*dx, _sum(dkernel, kernel), _sum(dbias, rbias))

        return out, grad

    return run(*xw, tf.convert_to_tensor(recurrent_kernel), tf.convert_to_tensor(recurrent_bias))


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
    """What the two layers share: the choice of path, and the input dropout as Keras's cell applies it."""

    _zero_start = False

    def call(self, sequences, initial_state=None, mask=None, training=False):
        self._zero_start = initial_state is None  # the fused recurrences start from zero states
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        # Inference (evaluation, prediction, attacks) keeps Keras's loop: a rolled loop traces faster, and in batches
        # of 2,048 images a step's ops are large enough that fewer of them gain nothing.
        if not (training and _covered(self, mask)):
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
        return _simple(_project(x, cell.kernel, cell.bias), cell.recurrent_kernel, self.return_sequences), []


@keras.saving.register_keras_serializable(package="tuner")
class GRU(_Fused, keras.layers.GRU):
    __doc__ = keras.layers.GRU.__doc__

    def _recurrence(self, x, cell):
        if cell.use_bias:
            input_bias, recurrent_bias = cell.bias[0], cell.bias[1]
        else:
            input_bias, recurrent_bias = None, tf.zeros((3 * cell.units,), cell.recurrent_kernel.dtype)
        xw = _project(x, cell.kernel, input_bias)
        return _gru(xw, cell.recurrent_kernel, recurrent_bias, self.return_sequences), []
