"""The build: planner, step loop and instruction handlers, COPY/ADD sources, the step cache."""
