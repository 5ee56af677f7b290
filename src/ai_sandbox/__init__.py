"""ai-sandbox: AI coding agents in a microVM."""

__version__ = "0.1.0"
