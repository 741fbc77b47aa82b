"""Online EWC (Schwarz et al. 2018): one running Fisher (sum over tasks), anchored at the latest
parameters."""

from .base import QuadraticPenalty
from .ewc import diagonal_fisher


class OnlineEWC(QuadraticPenalty):
    name = "online-ewc"
    default_coef = 700.0    # R1 protocol
    online = True

    def importance(self, batches, loss_fn):
        return diagonal_fisher(self.model, batches, loss_fn)
