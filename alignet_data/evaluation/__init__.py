"""Evaluation: odd-one-out metrics with intervals, Levels data, RSA, probing, representation analysis, SavedModels."""
