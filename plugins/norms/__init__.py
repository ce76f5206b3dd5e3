"""Built-in norms plugins."""
