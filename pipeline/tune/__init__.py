"""Hyperparameter search for stage three on a validation split carved from train.

``holdout``: the carve (train rows minus a seeded held-out fraction, scored on their clean
view); ``search``: the Optuna study whose trials are students trained on the cached targets;
``report``: its JSON, plot and the best parameters as a params override file.
"""
