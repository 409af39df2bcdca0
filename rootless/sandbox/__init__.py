"""The RUN sandbox: the plan as data, the fresh-process init that carries it out, seccomp."""
