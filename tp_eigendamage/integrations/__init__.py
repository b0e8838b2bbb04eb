"""Model-zoo specifics that Torch-Pruning needs to know (heads to keep, attention heads)."""
