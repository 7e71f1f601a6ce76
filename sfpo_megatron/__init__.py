"""Slow-Fast Policy Optimization (SFPO) trainer on Megatron-Core."""

__version__ = "0.1.0"
