"""onpolicy-sft: measure, rewrite and train toward the model's own distribution."""

__version__ = "0.1.0"
