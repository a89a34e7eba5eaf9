"""Benchmarks of dagfactory against dag-factory, a floor and dynamic task mapping."""
