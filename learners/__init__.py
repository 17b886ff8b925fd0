"""Learners: algorithms that drive any ModelHelper (full precision, uniform quantization)."""
