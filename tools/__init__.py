"""Command-line tools (the local multi-worker launcher)."""
