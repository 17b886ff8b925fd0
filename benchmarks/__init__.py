"""Benchmarks of tfquant, each run as `python -m benchmarks.<name>` from the repository root.

machine (facts, load), stats, rounds (interleaved timing until a ratio's interval is narrow enough), publish
(results JSON, BENCHMARKS.md sections), graphs (the timed ResNet graphs) and train_profile (op-time traces) serve
the scripts: train_overhead, rewrite_cost, memory, accuracy_table, export_table.
"""
from learners import import_tensorflow_quietly

# As the run scripts do: no start-up chatter, oneDNN kernels (about 2x faster convolution backprop here).
import_tensorflow_quietly()
