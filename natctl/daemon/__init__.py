"""`natctl serve`: registration listener, on-the-fly admission, periodic cleanup."""
