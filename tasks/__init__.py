"""Pipeline stages: one module per DVC stage, each a pure core plus run(params, inputs, outputs) -> metrics."""
