"""The in-graph count behind the document's per-epoch training figure, registered so saved models load."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tuner")
class LastBatchCorrect(keras.metrics.Metric):
    """The latest batch's count of correct answers: at an epoch's end, its last mini-batch's, from which
    `tuner.models.train` takes the document's SimpleRNN figure (that count over the batch's size). Keras's
    `accuracy` is the epoch's running mean, and with several steps run a call (`steps_per_execution`) callbacks
    see it only after each call, so the last batch's own count has to come from the graph. One sum and one
    assignment a step. Its ops are traced into every new model's train and test steps: small searches ran 4%
    slower with a first version (count and size in float64, divided in the graph) than without any metric, and
    this one measured no faster (BENCHMARKS.md, the nineteenth round).
    """

    def __init__(self, name: str = "last_batch_correct", dtype: str = "float32") -> None:
        super().__init__(name=name, dtype=dtype)
        self.correct = self.add_variable(shape=(), initializer="zeros", dtype=dtype, name="correct")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.correct.assign(keras.ops.sum(keras.metrics.sparse_categorical_accuracy(y_true, y_pred)))

    def result(self):
        # a new tensor, not the variable's value: Keras reads an epoch's figures after validation updated it
        return keras.ops.add(self.correct, 0.0)
