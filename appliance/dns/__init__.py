"""The guests' resolver: forwards to the site's resolver, never shows the segment."""
