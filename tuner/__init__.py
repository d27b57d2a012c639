"""tuner: hyperparameter tuning for Keras recurrent networks on MNIST, on Optuna.

Importing the package sets two TensorFlow defaults (an environment variable already set is left as it is),
before TensorFlow is first imported: tuner's modules import it lazily, inside what trains. So the `tuner`
command, the benchmarks and the tests all train on one configuration.

- TF_ENABLE_ONEDNN_OPTS=1. TensorFlow 2.21 reports its oneDNN operations on either way, but only with it set
  does it allocate through oneDNN's CPU allocator; left unset, an epoch of LSTM-100 took 1.4-1.5x as long on
  an AMD EPYC without AVX-512 (BENCHMARKS.md, the tenth round).
- TF_CPP_MIN_LOG_LEVEL=3: no C++ start-up lines in the output.
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
