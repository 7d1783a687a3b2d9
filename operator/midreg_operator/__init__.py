"""The kube-midregistrar operator: MidRegistrar resources in, registrar pods and their objects out."""

__version__ = "0.1.0"
