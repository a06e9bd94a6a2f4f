"""Multinomial logistic regression in NumPy on 60 features, 10 classes."""

from fedloom.tasks import SoftmaxRegression

task = SoftmaxRegression(num_features=60, num_classes=10)
