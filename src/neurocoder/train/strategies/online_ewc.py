"""Online EWC (Schwarz et al. 2018): one running Fisher (the sum over tasks), anchored at the latest
parameters, instead of one penalty term per task."""

from .ewc import EWC


class OnlineEWC(EWC):
    name = "online-ewc"
    default_coef = 700.0    # R1 protocol
    online = True
