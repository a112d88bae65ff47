"""Generators of test data with ground truth (synthetic particle sets and projects) for the test suite and benchmarks."""
