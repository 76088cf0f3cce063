"""Model families, one module each, registered by name (see ``registry``)."""
