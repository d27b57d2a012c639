"""tuner: hyperparameter tuning for Keras recurrent networks on MNIST, on Optuna.

Importing the package sets two TensorFlow defaults (an environment variable already set is left as it is),
before TensorFlow is first imported: tuner's modules import it lazily, inside what trains. So the `tuner`
command, the benchmarks and the tests all train on one configuration.

- TF_ENABLE_ONEDNN_OPTS=1. TensorFlow 2.21 reports its oneDNN operations on either way, but left unset it
  chooses the CPU allocator by the CPU: on an AMD EPYC without AVX-512 its default allocator, and an epoch of
  LSTM-100 took 1.4-1.5x as long (BENCHMARKS.md, the tenth round); on an Intel Xeon with AMX oneDNN's, as when
  set (the eleventh).
- TF_CPP_MIN_LOG_LEVEL=3: no C++ start-up lines in the output.
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
