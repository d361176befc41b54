"""Evaluation on MVTec-layout test sets: the metrics and the HTML report."""
