"""Compute and train: elastic ops, dynamic modules, the supernet, its extracted subnets, and training."""
from supernet.network import GateTrace, Supernet
from supernet.subnet import SubNet

__all__ = ["GateTrace", "Supernet", "SubNet"]
