"""Naive fine-tuning: train on each task in turn with the chosen optimiser (SGD, Adam, Adagrad)."""

from .base import Strategy


class Naive(Strategy):
    name = "naive"
