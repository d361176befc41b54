"""The built-in demo data set and the one-shot demo."""
