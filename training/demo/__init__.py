"""Data for the demo, the tests and the benchmarks: generated shapes, scikit-learn's digits,
photos that come with installed packages. Not part of training a user's model."""
