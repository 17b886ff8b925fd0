"""Benchmarks of tfquant: training-step overhead, rewrite cost, memory. Each script writes its BENCHMARKS.md section."""
