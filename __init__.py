"""dynas: latency-aware search of dynamic CNN configurations."""
__version__ = "0.1.0"
