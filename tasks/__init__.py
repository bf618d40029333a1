"""Pipeline stages: one module per DVC stage, each a pure core plus run(cfg, [seed,] inputs, outputs) -> metrics."""
