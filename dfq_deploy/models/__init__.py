"""Getting a user's model in: loading model files, capturing their graph, checking their weights."""
