"""ctprune: prune one trained Transformer into many variants cheaply, by composability."""

__version__ = "0.1.0"
