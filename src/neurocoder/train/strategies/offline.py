"""The offline upper bound: all tasks' training data at once (not continual)."""

from .base import Strategy


class Offline(Strategy):
    name = "offline"
    joint = True
