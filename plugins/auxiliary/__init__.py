"""Built-in auxiliary-task plugins: extra heads whose losses shape the shared features."""
