"""Console entry points (``cl-arch ...``): thin wrappers over the packages."""
