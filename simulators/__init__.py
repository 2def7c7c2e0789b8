"""eldersafe simulators package."""
