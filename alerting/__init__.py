"""eldersafe alerting package."""
