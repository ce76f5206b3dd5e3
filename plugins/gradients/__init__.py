"""Built-in gradients plugins."""
