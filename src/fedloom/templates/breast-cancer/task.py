"""Logistic regression in NumPy (softmax over 2 classes), trained by minibatch SGD.

To write your own NumPy task, wrap three plain functions in ``NumpyTask``:
``init(seed) -> weights``, ``train(weights, data, settings, rng) -> weights`` and
``evaluate(weights, x, y) -> {"accuracy": ..., "loss": ...}``.
"""

from fedloom.tasks import SoftmaxRegression

task = SoftmaxRegression(num_features=30, num_classes=2)
