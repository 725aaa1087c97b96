"""What several stages share and no stage owns: devices, atomic I/O, the feature cache,
statistics, torchrun ranks. Nothing here imports a stage, a head or the run directory."""
