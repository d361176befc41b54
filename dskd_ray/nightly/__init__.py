"""Bulk scoring on Ray Data and what it leaves: listing, the run, its stages, results, the index, drift, summary, gallery."""
