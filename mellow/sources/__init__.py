"""00_prepare: one module per dataset source, the registry of source kinds (registry.py), the prepare stage
and its settings. Imports audio, store and the bottom floor."""
