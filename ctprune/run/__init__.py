"""`ctprune run`, built on the stages: the job runtime (jobs), executors, the experiment file, the
experiment as a job graph (graph.run_experiment), the protocol's arithmetic, the typed summary, the report."""
