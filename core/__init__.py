"""Ray-free core: config, plugin registry, interfaces, data pipeline, trainer, checkpoints, logging."""
