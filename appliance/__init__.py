"""School AI appliance: one OpenAI-compatible gateway over local engines, with policy-bound cloud fallback."""

__version__ = "0.1.0"
