"""Bulk scoring on Ray Data and what it leaves: listing, the run, its stages, routes and the
night of several models (fleet), results, the index, drift, summary, gallery."""
