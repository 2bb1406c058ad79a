"""Operator tools, one module per command: doctor, recover, systemd, proof."""
