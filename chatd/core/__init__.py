"""The sans-I/O core: rules and data, no sockets, no trio."""
