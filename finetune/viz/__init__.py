"""Pictures of what the network learned: filters, top-activating patches, curves, confusion, mistakes."""
