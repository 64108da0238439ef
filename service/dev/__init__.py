"""Developer tools that the image leaves out (.dockerignore): the benchmark and the tiny test models."""
