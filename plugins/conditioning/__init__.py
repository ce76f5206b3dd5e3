"""Built-in conditioning plugins: the model told which terrain it sees."""
