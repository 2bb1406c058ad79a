"""The web dashboard and its API: what the CLI shows, as JSON and as one live page (``quantum-trader web``)."""
