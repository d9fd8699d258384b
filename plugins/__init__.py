"""pefc's built-in method plugins, one module each, registered through the ``pefc`` entry-point group."""
