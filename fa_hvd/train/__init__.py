"""Training components: data sets and models."""
