"""squeeze: compress transformer models and report, in numbers, what it cost."""

__version__ = "0.1.0"
