"""What the two HTML pages share: overlays, charts, HTML helpers."""
