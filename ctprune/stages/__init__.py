"""One module per pipeline stage: load inputs -> run -> write outputs."""
