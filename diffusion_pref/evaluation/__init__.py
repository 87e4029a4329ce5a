"""Evaluation: paired statistics (win rates, intervals) and the HTML report."""
