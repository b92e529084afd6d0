"""Prediction and evaluation of trained classifiers."""
