"""Evaluation and analysis of a trained model: accuracy, the linear probe, and the run's figures
and errors."""
