"""Worker registry: which worker slots exist, what they run, and whether they are alive."""
