"""Continual-learning strategies, one file each."""

from .base import QuadraticPenalty, Strategy
from .ewc import EWC
from .l2 import L2
from .mas import MAS
from .naive import Naive
from .offline import Offline
from .online_ewc import OnlineEWC
from .rehearsal import Rehearsal
from .si import SI

STRATEGIES = {cls.name: cls for cls in (Naive, L2, EWC, OnlineEWC, SI, MAS, Rehearsal, Offline)}

__all__ = ["Strategy", "QuadraticPenalty", "STRATEGIES", "Naive", "L2", "EWC", "OnlineEWC", "SI", "MAS",
           "Rehearsal", "Offline"]
