"""Quantum Trader: a fail-closed trading pipeline on Redis Streams."""

__version__ = "0.1.0"
