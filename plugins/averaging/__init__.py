"""Built-in weight-averaging plugins."""
