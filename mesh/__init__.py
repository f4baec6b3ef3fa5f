"""gpumesh: a peer-to-peer mesh of GPU agents coordinated through etcd."""

__version__ = "0.1.0"
