"""Integrations with transformers and optimum-cli."""
