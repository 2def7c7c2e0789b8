"""eldersafe gateway package."""
