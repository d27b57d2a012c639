"""The in-graph metric that gives the document's per-epoch training figure, registered so saved models load."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tuner")
class LastBatchAccuracy(keras.metrics.Metric):
    """Accuracy on the latest batch alone: at an epoch's end, on its last mini-batch (the document's SimpleRNN
    figure). Keras's `accuracy` is the epoch's running mean, and with several steps run per call
    (`steps_per_execution`) callbacks see it only after each call, so the last batch's own figure has to come
    from the graph. In float64: the count of correct answers over the batch's size, as Python divides them.
    """

    def __init__(self, name: str = "last_batch_accuracy", dtype: str = "float64") -> None:
        super().__init__(name=name, dtype=dtype)
        self.correct = self.add_variable(shape=(), initializer="zeros", dtype=dtype, name="correct")
        self.size = self.add_variable(shape=(), initializer="zeros", dtype=dtype, name="size")

    def update_state(self, y_true, y_pred, sample_weight=None):
        matches = keras.ops.cast(keras.metrics.sparse_categorical_accuracy(y_true, y_pred), self.dtype)
        self.correct.assign(keras.ops.sum(matches))
        self.size.assign(keras.ops.cast(keras.ops.size(matches), self.dtype))

    def result(self):
        # a new tensor, not the variables' values: Keras reads an epoch's figures after validation updated them
        return keras.ops.divide_no_nan(self.correct, self.size)
