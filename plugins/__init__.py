"""Built-in plugins. Registered through sslrun's own entry points, exactly like a third-party package's."""
