"""Smoke tests of the benchmark scripts (their --quick modes); speed is never asserted."""
