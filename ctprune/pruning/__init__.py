"""Pruning mechanics: module registry and configurations, importance scoring, surgery, the bank."""
