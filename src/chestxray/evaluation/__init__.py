"""Evaluation: metrics, threshold tuning, split evaluation, localization and HTML reports."""
